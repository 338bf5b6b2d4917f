"""The JSON API under /api/v1/: every AdminService operation, for provisioning scripts.

Thin on purpose: each route reads its input (Pydantic models, unknown fields refused),
asks the AdminService as the token's actor (`Actor.from_token`: the audit log records
`token:NAME (ID)`) and shapes the answer. The service decides what is allowed and what is
valid, with the same words the CLI prints; errors.py turns its refusals into JSON. Times
are ISO 8601 in UTC (`2026-05-01T12:00:00Z`); durations are seconds or "90s", "12h",
"30d", "2w".

Legacy passwords (hashes imported from Dovecot or htpasswd, issue 13) are auth_key records
of kind "legacy": every key answer says its `kind`, and for a legacy password its
`scheme` (Dovecot's name) and the key that `replaced_by` it; never the hash. /legacy lists
them and sets their deadline, /mailboxes/{address}/legacy/convert gives a mailbox a key in
their place. Importing them stays with the CLI (`keystore import`: an owner, with the file
on the relay's host): a password file has no business travelling over HTTP.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from keystore.http.auth import bearer, request_actor
from keystore.http.limits import MAX_INT, check_grace, check_time, clamp_time
from keystore.http.site import Site
from keystore.legacy import ACCEPTED
from keystore.models import AdminToken, AuditEvent, AuthKey, Mailbox, Workspace, canonical_address
from keystore.service import Actor, AdminService
from keystore.store import NotFound, StoreError

__all__ = ["PREFIX", "install", "parse_duration", "parse_when"]

PREFIX = "/api/v1"

# ------------------------------------------------------------------ values

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, bare: str = "s", field: str | None = None) -> float:
    """"90s", "12h", "30d", "2w"; a bare number is in `bare` units (days for the report
    filters: `unused_for=30`). StoreError (400, naming `field`) for anything else."""
    match = _DURATION_RE.match(text)
    if not match:
        raise StoreError(f"{field + ': ' if field else ''}invalid duration {text!r} "
                         "(use e.g. 90s, 12h, 30d, 2w)")
    return float(match.group(1)) * _UNIT[match.group(2) or bare]


def parse_when(text: str) -> float:
    """An ISO 8601 time (no zone: UTC), or a duration meaning that long ago ("24h")."""
    if _DURATION_RE.match(text):
        return datetime.now(UTC).timestamp() - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"since: invalid time {text!r} (use ISO 8601 such as 2026-05-01T12:00:00Z, "
                         "or a duration ago such as 24h)") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _epoch(moment: datetime | None, field: str = "expires") -> float | None:
    if moment is None:
        return None
    return check_time((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp(), field)


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch → `2026-05-01T12:00:00Z` (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(clamp_time(ts), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


When = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time",
                                      "example": "2026-05-01T12:00:00Z"})]
Count = Annotated[int, Field(le=MAX_INT)]  # what SQLite's INTEGER holds (limits.py)
# a JSON number only: lax mode would take `true` as 1 and "5" as 5 for a rate limit
StrictCount = Annotated[int, Field(le=MAX_INT, strict=True)]

# --------------------------------------------------------------- responses


class WorkspaceOut(BaseModel):
    name: str
    status: str = Field(description="active | suspended (every key of it refused at AUTH)")
    key_limit: int
    active_keys: int
    mailboxes: int
    suspended_reason: str | None
    suspended_at: When | None

    @classmethod
    def of(cls, w: Workspace) -> WorkspaceOut:
        return cls(name=w.name, status=w.status, key_limit=w.key_limit, active_keys=w.active_keys,
                   mailboxes=w.mailboxes, suspended_reason=w.suspended_reason,
                   suspended_at=iso(w.suspended_at))


class WorkspaceChange(BaseModel):
    workspace: WorkspaceOut
    mailbox_keys: int = Field(description="keys scoped to its mailboxes")
    workspace_keys: int = Field(description="keys scoped to the whole workspace")


class MailboxOut(BaseModel):
    address: str
    workspace: str
    aliases: list[str]
    status: str
    suspended_reason: str | None
    suspended_at: When | None
    route: str | None
    created: When
    keys: int = Field(description="keys scoped to this mailbox")
    workspace_keys: int = Field(description="keys of its workspace: they can log in as it too")

    @classmethod
    def of(cls, m: Mailbox) -> MailboxOut:
        return cls(address=m.address, workspace=m.workspace, aliases=list(m.aliases), status=m.status,
                   suspended_reason=m.suspended_reason, suspended_at=iso(m.suspended_at), route=m.route,
                   created=iso(m.created), keys=m.keys, workspace_keys=m.workspace_keys)


class MailboxRemoved(BaseModel):
    address: str
    keys_deleted: int


class KeyOut(BaseModel):
    id: str
    name: str
    scope: str = Field(description="mailbox:ADDRESS or workspace:NAME")
    workspace: str
    mailbox: str | None = Field(description="None: a workspace key, valid for each of its mailboxes")
    owner: str | None
    note: str | None
    permissions: list[str]
    status: str = Field(description="active | disabled | revoked")
    created: When
    expires: When | None
    rotated: When | None
    previous_valid_until: When | None = Field(description="the end of a rotation's grace")
    last_used: When | None
    last_ip: str | None
    last_failed: When | None = Field(description="the last refused login with the right secret")
    last_failed_ip: str | None
    last_failed_reason: str | None
    route: str | None
    rate_limit: int | None = Field(description="messages per minute; None: the relay's default")
    allow_from: list[str] = Field(description="client networks (CIDR); empty: from anywhere")
    kind: Literal["key", "legacy"] = Field(description="key: an auth key; legacy: a password hash "
                                                       "imported from Dovecot or htpasswd")
    scheme: str | None = Field(description="a legacy password's hash scheme, as Dovecot names it "
                                           "(SHA512-CRYPT, BLF-CRYPT, ...); None for a key")
    replaced_by: str | None = Field(description="a legacy password's replacement key (convert): "
                                                "the password is retired at that key's first use")

    @classmethod
    def of(cls, k: AuthKey) -> KeyOut:
        return cls(**_key_fields(k))


def _key_fields(k: AuthKey) -> dict[str, object]:
    """A key's answer fields: everything but its secret's keyed hash, and for a legacy
    password, its password hash (the audit of an import names the scheme only, too)."""
    return dict(id=k.id, name=k.name, scope=k.scope, workspace=k.workspace, mailbox=k.mailbox,
                owner=k.owner, note=k.note, permissions=list(k.permissions), status=k.status,
                created=iso(k.created), expires=iso(k.expires), rotated=iso(k.rotated),
                previous_valid_until=iso(k.previous_valid_until), last_used=iso(k.last_used),
                last_ip=k.last_ip, last_failed=iso(k.last_failed), last_failed_ip=k.last_failed_ip,
                last_failed_reason=k.last_failed_reason, route=k.route, rate_limit=k.rate_limit,
                allow_from=list(k.allow_from), kind=k.kind,
                scheme=ACCEPTED.get(k.scheme, k.scheme) if k.scheme else None, replaced_by=k.replaced_by)


class LegacyOut(KeyOut):
    """A legacy password: a key record (`expires` is its deadline, `last_used` / `last_ip`
    who still logs in with it) and its state."""

    state: Literal["active", "disabled", "ended", "retired"]

    @classmethod
    def of(cls, k: AuthKey, now: float | None = None) -> LegacyOut:
        return cls(**_key_fields(k), state=k.legacy_state(time.time() if now is None else now))


class SmtpSettings(BaseModel):
    """What to paste into the mail client: host, a port, username; the password is the secret."""

    host: str
    starttls_port: int | None = Field(description="submission with STARTTLS (usually 587)")
    tls_port: int | None = Field(description="implicit TLS (usually 465)")
    username: str | None = Field(description="the mailbox; None for a workspace key: any active "
                                             "mailbox of the workspace")


class KeySecret(BaseModel):
    """A key and its secret: shown this once (only a keyed hash is stored)."""

    key: KeyOut
    secret: str
    smtp: SmtpSettings


class Conversion(KeySecret):
    """The key that replaces a legacy password (its secret shown this once), and the
    password, which keeps working until the key's first login, then is retired."""

    legacy: KeyOut


class AuditOut(BaseModel):
    id: int
    at: When
    actor: str = Field(description="a shell user, or token:NAME (ID) for a change made over HTTP")
    action: str
    key_id: str | None
    mailbox: str | None
    workspace: str | None
    detail: str | None

    @classmethod
    def of(cls, e: AuditEvent) -> AuditOut:
        return cls(id=e.id, at=iso(e.at), actor=e.actor, action=e.action, key_id=e.key_id,
                   mailbox=e.mailbox, workspace=e.workspace, detail=e.detail)


class TokenOut(BaseModel):
    id: str
    name: str
    role: str = Field(description="viewer | editor | owner")
    workspaces: list[str] = Field(description="empty: every workspace")
    status: str
    created: When
    created_by: str
    last_used: When | None
    last_ip: str | None
    revoked_at: When | None

    @classmethod
    def of(cls, t: AdminToken) -> TokenOut:
        return cls(id=t.id, name=t.name, role=t.role, workspaces=list(t.workspaces), status=t.status,
                   created=iso(t.created), created_by=t.created_by, last_used=iso(t.last_used),
                   last_ip=t.last_ip, revoked_at=iso(t.revoked_at))


class TokenSecret(BaseModel):
    token: TokenOut
    secret: str = Field(description="the admin token, shown this once")


class Me(BaseModel):
    actor: str
    role: str
    workspaces: list[str] | None = Field(description="None: every workspace")


class WorkspaceList(BaseModel):
    workspaces: list[WorkspaceOut]


class MailboxList(BaseModel):
    mailboxes: list[MailboxOut]


class KeyList(BaseModel):
    keys: list[KeyOut]


class LegacyList(BaseModel):
    passwords: list[LegacyOut]


class Deadline(BaseModel):
    deadline: When
    passwords: list[LegacyOut] = Field(description="those given this deadline")


class AuditList(BaseModel):
    events: list[AuditOut]


class TokenList(BaseModel):
    tokens: list[TokenOut]


# ---------------------------------------------------------------- requests


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _unicode_text(self) -> _In:
        """JSON's `\\ud800` escape is a lone surrogate: a str no database text can hold (a
        500 from deep in the keystore). A StoreError, not a ValueError: Pydantic lets it
        through, and errors.py answers it 400 naming the field."""
        for name in self.model_fields_set:
            value = getattr(self, name)
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode()
                    except UnicodeEncodeError:
                        raise StoreError(f"{name}: not text (a lone UTF-16 surrogate)") from None
        return self


class WorkspaceUpdate(_In):
    key_limit: Count = Field(description="active keys the workspace may hold")


class Suspension(_In):
    reason: str | None = None


class MailboxIn(_In):
    address: str
    workspace: str
    aliases: list[str] = []
    route: str | None = None


class KeyIn(_In):
    name: str = Field(description="what uses the key, e.g. 'CRM sync'; fixed once created")
    mailbox: str | None = Field(None, description="scope the key to this mailbox, or...")
    workspace: str | None = Field(None, description="...to every mailbox of this workspace")
    owner: str | None = None
    note: str | None = None
    permissions: list[str] = ["email.send"]
    expires: datetime | None = Field(None, description="ISO 8601; no zone: UTC")
    route: str | None = None
    rate_limit: StrictCount | None = None
    allow_from: list[str] = Field([], description="client networks (CIDR) it may log in from")


class KeyUpdate(_In):
    """Only the fields given change; null clears a setting."""

    route: str | None = None
    rate_limit: StrictCount | None = None
    expires: datetime | None = None
    owner: str | None = None
    note: str | None = None
    allow_from: list[str] | None = None


class RevokeMany(_In):
    owner: str | None = Field(None, description="every key of this owner, or...")
    mailbox: str | None = Field(None, description="...every key scoped to this mailbox")


class Rotation(_In):
    grace: float | str = Field(0, description="how long the previous secret keeps working: "
                                              "seconds, or \"90s\", \"12h\", \"7d\"")


class Confirmation(_In):
    confirm: str = Field(description="the key's name, typed by the person deleting it")


class LegacyExpiry(_In):
    after: str | None = Field(None, description="from now: \"30d\", \"12h\", \"2w\" "
                                                "(a bare number: seconds); or...")
    at: datetime | None = Field(None, description="...ISO 8601 (no zone: UTC)")
    workspace: str | None = Field(None, description="only this workspace's passwords")
    mailbox: str | None = Field(None, description="only this mailbox's")

    @model_validator(mode="after")
    def _one_time(self) -> LegacyExpiry:
        if (self.after is None) == (self.at is None):
            raise StoreError("give the deadline as exactly one of after (a duration from now) or at "
                             "(an ISO 8601 time)")
        return self


class LegacyConvert(_In):
    name: str = Field("converted from legacy password",
                      description="the new key's name: what will use it (e.g. 'Thunderbird')")


class TokenIn(_In):
    name: str
    role: Literal["viewer", "editor", "owner"]
    workspaces: list[str] = []


# ------------------------------------------------------------------ routes


async def _actor(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> Actor:
    return await request_actor(request, credentials)


def _service(request: Request) -> AdminService:
    return request.app.state.service


def _smtp(site: Site, key: AuthKey) -> SmtpSettings:
    return SmtpSettings(host=site.smtp_host, starttls_port=site.submission_port,
                        tls_port=site.submissions_port, username=key.mailbox)


def _secret(request: Request, key: AuthKey, secret: str) -> KeySecret:
    return KeySecret(key=KeyOut.of(key), secret=secret, smtp=_smtp(request.app.state.site, key))


class ErrorDetail(BaseModel):
    code: str = Field(description="stable: invalid, unauthorized, forbidden, not_found, conflict, "
                                  "too_large, throttled, unavailable, internal")
    message: str = Field(description="for people; may change between versions")


class ErrorOut(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (400, "invalid input (the message names the field)"),
        (401, "no, unknown or revoked admin token"),
        (403, "the token's role or workspaces do not allow it"),
        (404, "no such record, or one in a workspace the token does not cover"),
        (409, "the record's state refuses it (already revoked, suspended, ...)"),
        (429, "too many failed token logins from this address (see Retry-After)"),
        (503, "the keystore is unavailable; try again"),
    )
}
ActorDep = Annotated[Actor, Depends(_actor)]
ServiceDep = Annotated[AdminService, Depends(_service)]
router = APIRouter(prefix=PREFIX, responses=_ERRORS)


@router.get("/me", tags=["tokens"], summary="The token's actor, role and workspaces")
async def me(actor: ActorDep) -> Me:
    return Me(actor=actor.name, role=actor.role,
              workspaces=None if actor.workspaces is None else sorted(actor.workspaces))


# ------------------------------------------------------------ workspaces


@router.get("/workspaces", tags=["workspaces"])
async def list_workspaces(actor: ActorDep, svc: ServiceDep) -> WorkspaceList:
    return WorkspaceList(workspaces=[WorkspaceOut.of(w) for w in await svc.workspaces(actor)])


@router.get("/workspaces/{name}", tags=["workspaces"])
async def get_workspace(name: str, actor: ActorDep, svc: ServiceDep) -> WorkspaceOut:
    return WorkspaceOut.of(await svc.workspace(actor, name))


@router.patch("/workspaces/{name}", tags=["workspaces"], summary="Set the workspace's key limit (owner)")
async def update_workspace(name: str, body: WorkspaceUpdate, actor: ActorDep,
                           svc: ServiceDep) -> WorkspaceOut:
    await svc.set_key_limit(actor, name, body.key_limit)
    return WorkspaceOut.of(await svc.workspace(actor, name))


@router.post("/workspaces/{name}/suspend", tags=["workspaces"],
             summary="Refuse every key of the workspace at AUTH until resumed (owner)")
async def suspend_workspace(name: str, actor: ActorDep, svc: ServiceDep,
                            body: Suspension | None = None) -> WorkspaceChange:
    mailbox_keys, workspace_keys = await svc.suspend_workspace(
        actor, name, reason=body.reason if body else None)
    return WorkspaceChange(workspace=WorkspaceOut.of(await svc.workspace(actor, name)),
                           mailbox_keys=mailbox_keys, workspace_keys=workspace_keys)


@router.post("/workspaces/{name}/resume", tags=["workspaces"])
async def resume_workspace(name: str, actor: ActorDep, svc: ServiceDep) -> WorkspaceChange:
    mailbox_keys, workspace_keys = await svc.resume_workspace(actor, name)
    return WorkspaceChange(workspace=WorkspaceOut.of(await svc.workspace(actor, name)),
                           mailbox_keys=mailbox_keys, workspace_keys=workspace_keys)


# ------------------------------------------------------------- mailboxes


@router.get("/mailboxes", tags=["mailboxes"])
async def list_mailboxes(actor: ActorDep, svc: ServiceDep, workspace: str | None = None) -> MailboxList:
    return MailboxList(mailboxes=[MailboxOut.of(m) for m in await svc.mailboxes(actor, workspace)])


@router.post("/mailboxes", tags=["mailboxes"], status_code=201)
async def add_mailbox(body: MailboxIn, actor: ActorDep, svc: ServiceDep) -> MailboxOut:
    return MailboxOut.of(await svc.add_mailbox(actor, body.address, workspace=body.workspace,
                                               aliases=body.aliases, route=body.route))


@router.get("/mailboxes/{address}", tags=["mailboxes"])
async def get_mailbox(address: str, actor: ActorDep, svc: ServiceDep) -> MailboxOut:
    return MailboxOut.of(await svc.mailbox(actor, address))


@router.post("/mailboxes/{address}/suspend", tags=["mailboxes"])
async def suspend_mailbox(address: str, actor: ActorDep, svc: ServiceDep,
                          body: Suspension | None = None) -> MailboxOut:
    return MailboxOut.of(await svc.suspend_mailbox(actor, address, reason=body.reason if body else None))


@router.post("/mailboxes/{address}/resume", tags=["mailboxes"])
async def resume_mailbox(address: str, actor: ActorDep, svc: ServiceDep) -> MailboxOut:
    return MailboxOut.of(await svc.resume_mailbox(actor, address))


@router.delete("/mailboxes/{address}", tags=["mailboxes"],
               summary="Remove a mailbox; with keys only when force=true (they are deleted with it)")
async def remove_mailbox(address: str, actor: ActorDep, svc: ServiceDep,
                         force: bool = False) -> MailboxRemoved:
    deleted = await svc.remove_mailbox(actor, address, force=force)
    return MailboxRemoved(address=canonical_address(address), keys_deleted=deleted)


# ------------------------------------------------------------------ keys


@router.get("/keys", tags=["keys"], summary="Keys matching every filter given")
async def list_keys(
    actor: ActorDep, svc: ServiceDep,
    mailbox: Annotated[str | None, Query(description="every key able to log in as it "
                                                     "(its own and its workspace's)")] = None,
    workspace: str | None = None,
    search: Annotated[str | None, Query(description="in name, owner, note, mailbox, workspace, id")] = None,
    status: Annotated[str | None, Query(description="active | disabled | revoked")] = None,
    owner: str | None = None,
    unused_for: Annotated[str | None, Query(description="active keys unused this long: days, "
                                                        "or 30d, 12h")] = None,
    not_rotated_for: Annotated[str | None, Query(description="active keys not rotated this long")] = None,
    kind: Annotated[str | None, Query(description="key: auth keys only; legacy: imported legacy "
                                                  "passwords only")] = None,
) -> KeyList:
    keys = await svc.keys(
        actor, mailbox=mailbox, workspace=workspace, search=search, status=status, owner=owner,
        unused_for=None if unused_for is None else parse_duration(unused_for, bare="d", field="unused_for"),
        not_rotated_for=None if not_rotated_for is None
        else parse_duration(not_rotated_for, bare="d", field="not_rotated_for"),
        kind=kind,
    )
    return KeyList(keys=[KeyOut.of(k) for k in keys])


@router.post("/keys", tags=["keys"], status_code=201,
             summary="Create a key; the answer holds its secret, shown this once")
async def create_key(body: KeyIn, request: Request, actor: ActorDep, svc: ServiceDep) -> KeySecret:
    key, secret = await svc.create_key(
        actor, name=body.name, mailbox=body.mailbox, workspace=body.workspace, owner=body.owner,
        note=body.note, permissions=body.permissions, expires=_epoch(body.expires), route=body.route,
        rate_limit=body.rate_limit, allow_from=body.allow_from,
    )
    return _secret(request, key, secret)


@router.post("/keys/revoke", tags=["keys"],
             summary="Revoke every key of one owner, or scoped to one mailbox")
async def revoke_many(body: RevokeMany, actor: ActorDep, svc: ServiceDep) -> KeyList:
    revoked = await svc.revoke_keys(actor, owner=body.owner, mailbox=body.mailbox)
    return KeyList(keys=[KeyOut.of(k) for k in revoked])


@router.get("/keys/{key_id}", tags=["keys"])
async def get_key(key_id: str, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    return KeyOut.of(await svc.key(actor, key_id))


@router.patch("/keys/{key_id}", tags=["keys"],
              summary="Change route, rate limit, expiry, owner, note or client networks")
async def update_key(key_id: str, body: KeyUpdate, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    changes: dict[str, object] = {}
    for name in body.model_fields_set:
        value = getattr(body, name)
        if name == "expires":
            value = _epoch(value)
        elif name == "allow_from" and value is not None:
            value = tuple(value)
        changes[name] = value
    return KeyOut.of(await svc.update_key(actor, key_id, changes))


@router.post("/keys/{key_id}/disable", tags=["keys"])
async def disable_key(key_id: str, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    return KeyOut.of(await svc.disable_key(actor, key_id))


@router.post("/keys/{key_id}/enable", tags=["keys"])
async def enable_key(key_id: str, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    return KeyOut.of(await svc.enable_key(actor, key_id))


@router.post("/keys/{key_id}/revoke", tags=["keys"], summary="Revoke a key, for good")
async def revoke_key(key_id: str, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    return KeyOut.of(await svc.revoke_key(actor, key_id))


@router.post("/keys/{key_id}/rotate", tags=["keys"],
             summary="A new secret (shown once); the old one works for `grace` more")
async def rotate_key(key_id: str, request: Request, actor: ActorDep, svc: ServiceDep,
                     body: Rotation | None = None) -> KeySecret:
    grace = (body or Rotation()).grace
    seconds = check_grace(parse_duration(grace, field="grace") if isinstance(grace, str) else float(grace))
    key, secret = await svc.rotate_key(actor, key_id, grace=seconds)
    return _secret(request, key, secret)


@router.post("/keys/{key_id}/end-grace", tags=["keys"],
             summary="Retire the previous secret now (every caller has the new one)")
async def end_grace(key_id: str, actor: ActorDep, svc: ServiceDep) -> KeyOut:
    return KeyOut.of(await svc.end_rotation_grace(actor, key_id))


@router.delete("/keys/{key_id}", tags=["keys"],
               summary="Delete a key record; confirm with its name (body or ?confirm=)")
async def delete_key(
    key_id: str, actor: ActorDep, svc: ServiceDep,
    confirm: Annotated[str | None, Query(description="the key's name")] = None,
    body: Annotated[Confirmation | None, Body()] = None,
) -> KeyOut:
    typed = body.confirm if body is not None else confirm
    if typed is None:
        raise StoreError("confirm: type the key's name to delete it ({\"confirm\": NAME} or ?confirm=NAME)")
    return KeyOut.of(await svc.delete_key(actor, key_id, confirm=typed))


# ------------------------------------------------------ legacy passwords


@router.get("/legacy", tags=["legacy passwords"],
            summary="Legacy passwords, with their deadline, last use and client (keystore legacy list)")
async def list_legacy(
    actor: ActorDep, svc: ServiceDep, workspace: str | None = None,
    retired: Annotated[bool, Query(alias="all", description="retired ones too (the CLI's --all)")] = False,
) -> LegacyList:
    found = await svc.legacy_passwords(actor, workspace=workspace)
    now = time.time()
    return LegacyList(passwords=[LegacyOut.of(k, now) for k in found if retired or k.status != "revoked"])


@router.post("/legacy/expire", tags=["legacy passwords"],
             summary="A deadline after which the legacy passwords in scope stop working (editor)")
async def expire_legacy(body: LegacyExpiry, actor: ActorDep, svc: ServiceDep) -> Deadline:
    if body.after is not None:
        deadline = check_time(time.time() + parse_duration(body.after, field="after"), "after")
    else:
        deadline = _epoch(body.at, "at")
    assert deadline is not None  # one of them is given (LegacyExpiry)
    changed = await svc.expire_legacy(actor, deadline, workspace=body.workspace, mailbox=body.mailbox)
    now = time.time()
    return Deadline(deadline=iso(deadline), passwords=[LegacyOut.of(k, now) for k in changed])


@router.post("/mailboxes/{address}/legacy/convert", tags=["legacy passwords"], status_code=201,
             summary="Give a mailbox with a legacy password a key (its secret shown this once); "
                     "the password is retired at the key's first use (editor)")
async def convert_legacy(address: str, request: Request, actor: ActorDep, svc: ServiceDep,
                         body: LegacyConvert | None = None) -> Conversion:
    legacy, key, secret = await svc.convert_legacy(actor, address, name=(body or LegacyConvert()).name)
    return Conversion(key=KeyOut.of(key), secret=secret, smtp=_smtp(request.app.state.site, key),
                      legacy=KeyOut.of(legacy))


# ----------------------------------------------------------------- audit


@router.get("/audit", tags=["audit"], summary="The audit trail, oldest first")
async def audit(
    actor: ActorDep, svc: ServiceDep,
    key: Annotated[str | None, Query(description="entries of this key id")] = None,
    mailbox: str | None = None,
    since: Annotated[str | None, Query(description="ISO 8601, or a duration ago (24h)")] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="the newest N")] = None,
) -> AuditList:
    events = await svc.audit(actor, key_id=key, mailbox=mailbox,
                             since=None if since is None else parse_when(since), limit=limit)
    return AuditList(events=[AuditOut.of(e) for e in events])


# ---------------------------------------------------------- admin tokens


@router.get("/admin-tokens", tags=["tokens"], summary="Every admin token (owner)")
async def list_tokens(actor: ActorDep, svc: ServiceDep) -> TokenList:
    return TokenList(tokens=[TokenOut.of(t) for t in await svc.tokens(actor)])


@router.post("/admin-tokens", tags=["tokens"], status_code=201,
             summary="Create an admin token (owner); its secret is shown this once")
async def create_token(body: TokenIn, actor: ActorDep, svc: ServiceDep) -> TokenSecret:
    token, secret = await svc.create_token(actor, name=body.name, role=body.role, workspaces=body.workspaces)
    return TokenSecret(token=TokenOut.of(token), secret=secret)


@router.get("/admin-tokens/{token_id}", tags=["tokens"])
async def get_token(token_id: str, actor: ActorDep, svc: ServiceDep) -> TokenOut:
    for token in await svc.tokens(actor):
        if token.id == token_id:
            return TokenOut.of(token)
    raise NotFound(f"unknown admin token: {token_id}")


@router.post("/admin-tokens/{token_id}/revoke", tags=["tokens"])
async def revoke_token(token_id: str, actor: ActorDep, svc: ServiceDep) -> TokenOut:
    return TokenOut.of(await svc.revoke_token(actor, token_id))


def install(app: FastAPI) -> None:
    """The API's routes; an unknown path under /api/ gets errors.py's JSON 404 (and a known
    path with the wrong method its 405)."""
    app.include_router(router)
