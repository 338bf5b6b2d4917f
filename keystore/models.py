"""Records the keystore hands out: workspaces, mailboxes, keys, audit events, login verdicts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "PERMISSIONS",
    "ROTATION_DUE_AFTER",
    "UNUSED_AFTER",
    "ROLES",
    "AdminToken",
    "AuditEvent",
    "AuthKey",
    "Identity",
    "Mailbox",
    "Reason",
    "Workspace",
    "canonical_address",
    "review_flags",
]

PERMISSIONS = ("email.send", "email.receive", "mailbox.read", "mailbox.settings.update")
# A key review's thresholds (`key list` FLAGS, the console's badges; the reports take any)
UNUSED_AFTER = 30 * 86400.0  # no use for 30 days (counting from creation when never used)
ROTATION_DUE_AFTER = 90 * 86400.0  # the secret is 90 days old
# Admin token roles, weakest first: a viewer reads; an editor manages keys and mailboxes of
# its workspaces; an owner does everything, tokens included (keystore/service.py decides).
ROLES = ("viewer", "editor", "owner")


def canonical_address(address: str) -> str:
    """The form addresses are stored and compared in: lower case, no trailing dot. Domains
    are case-insensitive (RFC 5321); local parts may not be, but two mailboxes differing
    only in case would be a trap, so the whole address is compared case-insensitively."""
    return address.strip().lower().rstrip(".")


class Reason(enum.StrEnum):
    """Why a login was refused. Only BAD_CREDENTIALS may be shown to someone without the key."""

    BAD_CREDENTIALS = "bad_credentials"
    REVOKED = "revoked"
    DISABLED = "disabled"
    EXPIRED = "expired"
    SUSPENDED = "suspended"
    NO_SEND_PERMISSION = "no_send_permission"
    ROTATED = "rotated"  # only from recheck: the secret a session logged in with is no longer valid
    NOT_ALLOWED_FROM = "not_allowed_from"  # the client's address is outside the key's allow-from
    # legacy passwords (issue 13), with the right password: revoked, disabled or past the
    # deadline of `keystore legacy expire` (the reply tells the client to use an auth key);
    # and, from recheck only, a session whose password was changed by a re-import
    PASSWORD_RETIRED = "password_retired"  # noqa: S105 (a reason, not a password)
    PASSWORD_CHANGED = "password_changed"  # noqa: S105


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who a session is after a successful AUTH: what the sender policy and routing need."""

    mailbox: str
    key_id: str
    workspace: str
    permissions: frozenset[str]
    aliases: tuple[str, ...]
    route: str | None
    rate_limit: int | None = None  # messages per minute; None: the relay's default
    # The keyed hash of the secret the session logged in with (never the secret): a
    # recheck compares it with the key's current and rotation-grace hashes, so a session
    # ends with its secret. Not shown by repr, not part of equality.
    secret_hash: bytes = field(default=b"", repr=False, compare=False)
    # The address the session logged in from: a recheck judges it against the key's
    # allow-from as it stands then, so narrowing the list ends sessions outside it.
    client_ip: str = field(default="", compare=False)
    # logged in with an imported legacy password (key_id is that credential's id), not a key
    legacy: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Workspace:
    name: str
    key_limit: int
    active_keys: int
    mailboxes: int
    status: str = "active"  # "suspended": every key of it fails with Reason.SUSPENDED
    suspended_reason: str | None = None
    suspended_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Mailbox:
    address: str
    workspace: str
    aliases: tuple[str, ...]
    status: str
    suspended_reason: str | None
    suspended_at: float | None
    route: str | None
    created: float
    keys: int  # keys scoped to this mailbox
    workspace_keys: int = 0  # keys scoped to its workspace: they can log in as it too
    legacy_password: bool = False  # has an imported legacy password not yet revoked


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthKey:
    id: str
    name: str
    owner: str | None
    note: str | None
    workspace: str
    mailbox: str | None  # None: a workspace key, valid for every active mailbox of it
    permissions: tuple[str, ...]
    status: str
    created: float
    expires: float | None
    rotated: float | None
    previous_valid_until: float | None
    last_used: float | None
    last_ip: str | None
    route: str | None
    rate_limit: int | None = None
    allow_from: tuple[str, ...] = ()  # client networks (CIDR); empty: from anywhere
    # the last login with the right secret that was refused (revoked, disabled, from
    # outside allow_from, ...): when, from where, and the Reason's value
    last_failed: float | None = None
    last_failed_ip: str | None = None
    last_failed_reason: str | None = None
    # "key", or "legacy": a password hash imported from Dovecot or htpasswd (issue 13),
    # with its libpass scheme and the key of `keystore legacy convert` that retires it
    kind: str = "key"
    scheme: str | None = None
    replaced_by: str | None = None

    @property
    def legacy(self) -> bool:
        return self.kind == "legacy"

    def legacy_state(self, now: float) -> str:
        """What `keystore legacy list` and the API call a legacy password's state: active,
        disabled, ended (past its deadline) or retired (revoked: converted and replaced, or
        by hand)."""
        if self.status == "revoked":
            return "retired"
        if self.expires is not None and self.expires <= now:
            return "ended"
        return self.status

    @property
    def scope(self) -> str:
        return f"mailbox:{self.mailbox}" if self.mailbox else f"workspace:{self.workspace}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    id: int
    at: float
    actor: str
    action: str
    key_id: str | None
    mailbox: str | None
    detail: str | None
    workspace: str | None = None  # None: owners only (see schema.py's migration 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminToken:
    """An admin token (`keystore admin-token`, the HTTP API and console); never its secret."""

    id: str
    name: str
    role: str  # one of ROLES
    workspaces: tuple[str, ...]  # empty: every workspace (owners always)
    status: str  # active | revoked
    created: float
    created_by: str
    last_used: float | None
    last_ip: str | None
    revoked_at: float | None


def review_flags(key: AuthKey, now: float) -> tuple[str, ...]:
    """What a review of keys should look at: "legacy" (an imported password: always
    shown, so every listing tells it from a key), then, only for credentials that could
    log in (active, not expired), as the `--unused-for` / `--not-rotated-for` reports:
    "unused", "rotation-due" (keys only: a legacy password is not rotated, it is converted)."""
    flags = ["legacy"] if key.legacy else []
    if key.status != "active" or (key.expires is not None and key.expires <= now):
        return tuple(flags)
    if (key.last_used or key.created) <= now - UNUSED_AFTER:
        flags.append("unused")
    if not key.legacy and (key.rotated or key.created) <= now - ROTATION_DUE_AFTER:
        flags.append("rotation-due")
    return tuple(flags)
