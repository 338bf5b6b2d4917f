"""The console's pages: reads render a template, writes are POST-redirect-GET.

Each handler asks `open_console` (or `posted`, which also checks the CSRF token) for the
session's actor, calls one AdminService operation and renders or redirects. A refusal from
the service (Forbidden, NotFound, Conflict, bad input) is shown on the page the person was
on, in a banner, with the matching 4xx status. Nothing here catches anything broader: a
bug reaches errors.py's handler, which logs it and shows the console's error page (500,
never a traceback).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from starlette.datastructures import FormData
from starlette.responses import RedirectResponse, Response

from keystore.http.console import csrf
from keystore.http.console.forms import KeyForm, expiry_text, grace_seconds, networks_text
from keystore.http.console.render import ROTATION_DUE, UNUSED, error_page, page, segment
from keystore.http.console.session import COOKIE, Session, SessionStore
from keystore.models import PERMISSIONS, AuthKey
from keystore.service import Actor, AdminService, Forbidden
from keystore.store import Conflict, KeystoreUnavailable, NotFound, StoreError

__all__ = ["LoginRequired", "open_console", "posted", "router", "sessions_of", "status_of"]

router = APIRouter(include_in_schema=False)
KEY_FIELDS = ("name", "owner", "note", "expires", "route", "rate_limit", "allow_from")


class LoginRequired(Exception):
    """No live session (none, expired, or its token revoked): the login page."""


@dataclass(slots=True)
class Console:
    """One request's view: who asks, through which session, of which service."""

    request: Request
    session: Session
    actor: Actor
    service: AdminService

    @property
    def can_edit(self) -> bool:
        return self.actor.role in ("editor", "owner")


def sessions_of(request: Request) -> SessionStore:
    state = request.app.state
    store = getattr(state, "console_sessions", None)
    if store is None:
        store = state.console_sessions = SessionStore(ttl=state.site.session_ttl)
    return store


def status_of(exc: Exception) -> int:
    """The HTTP status a refusal is shown with."""
    for kind, status in ((Forbidden, 403), (NotFound, 404), (Conflict, 409), (StoreError, 400),
                         (KeystoreUnavailable, 503)):
        if isinstance(exc, kind):
            return status
    raise exc


REFUSALS = (StoreError, KeystoreUnavailable)


async def open_console(request: Request) -> Console:
    sessions = sessions_of(request)
    session = sessions.get(request.cookies.get(COOKIE))
    if session is None:
        raise LoginRequired
    service: AdminService = request.app.state.service
    actor = await sessions.actor(session, service)
    if actor is None:
        raise LoginRequired
    state = request.state
    state.actor, state.csrf = actor, session.csrf
    state.can_edit = actor.role in ("editor", "owner")
    state.is_owner = actor.role == "owner"
    state.flash = session.take_flash()
    return Console(request, session, actor, service)


async def posted(request: Request) -> tuple[Console, FormData]:
    """The console and the form of a POST whose CSRF token is its session's (else
    csrf.CsrfRefused: 403, and nothing happens)."""
    console = await open_console(request)
    form = await request.form()
    csrf.check(console.session.csrf, form.get(csrf.FIELD))
    for name, value in form.multi_items():
        # a multipart form names its own charset (raw_unicode_escape makes `\ud800` a lone
        # surrogate): text no database holds, a 500 from deep in the keystore otherwise
        if isinstance(value, str) and not _is_text(value):
            raise StoreError(f"{name if _is_text(name) else 'a field'}: not text (a lone UTF-16 surrogate)")
    return console, form


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _need_editor(console: Console, what: str) -> None:
    """The form of a write is refused up front to a viewer, as its POST would be (the
    service's words), rather than shown to be refused once filled in."""
    if not console.can_edit:
        raise Forbidden(f"{what} needs the editor role; this is {console.actor.role}")


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _refused(console: Console, exc: Exception) -> Response:
    """A refusal with nothing to show beside it (the record asked for is not there, or not
    this token's to see)."""
    return error_page(console.request, status_of(exc), str(exc))


async def _act(
    console: Console, action: Callable[[], Awaitable[object]], *, done: str, said: str,
    back: Callable[[str, int], Awaitable[Response]],
) -> Response:
    """Do a write; on success tell the next page `said` and go to `done`; on a refusal
    render `back` with the refusal as its banner and status."""
    try:
        await action()
    except REFUSALS as exc:
        return await back(str(exc), status_of(exc))
    console.session.say(said)
    return _see_other(done)


def _where(key: AuthKey) -> str:
    """The page a key belongs on: its mailbox's, or its workspace's."""
    if key.mailbox:
        return f"/mailboxes/{segment(key.mailbox)}"
    return f"/workspaces/{segment(key.workspace)}"


# ------------------------------------------------------------------ workspaces

@router.get("/")
async def workspaces(request: Request) -> Response:
    console = await open_console(request)
    return await _workspaces_page(console)


async def _workspaces_page(console: Console, error: str | None = None, status: int = 200) -> Response:
    try:
        found = await console.service.workspaces(console.actor)
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(console.request, "workspaces.html", status, workspaces=found, error=error)


@router.post("/workspaces/{name}/suspend")
async def suspend_workspace(request: Request, name: str) -> Response:
    console, form = await posted(request)
    reason = str(form.get("reason") or "").strip() or None
    return await _act(
        console, lambda: console.service.suspend_workspace(console.actor, name, reason=reason),
        done="/", said=f"Workspace {name} suspended: every key of it is refused at login.",
        back=lambda msg, status: _workspaces_page(console, msg, status))


@router.post("/workspaces/{name}/resume")
async def resume_workspace(request: Request, name: str) -> Response:
    console, _ = await posted(request)
    return await _act(
        console, lambda: console.service.resume_workspace(console.actor, name),
        done="/", said=f"Workspace {name} resumed.",
        back=lambda msg, status: _workspaces_page(console, msg, status))


@router.get("/workspaces/{name}")
async def workspace(request: Request, name: str) -> Response:
    console = await open_console(request)
    try:
        found = await console.service.workspace(console.actor, name)
        mailboxes = await console.service.mailboxes(console.actor, name)
        keys = [k for k in await console.service.keys(console.actor, workspace=name) if k.mailbox is None]
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(request, "workspace.html", workspace=found, mailboxes=mailboxes, keys=keys)


# ------------------------------------------------------------------- mailboxes

@router.get("/mailboxes/{address}")
async def mailbox(request: Request, address: str) -> Response:
    console = await open_console(request)
    return await _mailbox_page(console, address)


async def _mailbox_page(console: Console, address: str, error: str | None = None,
                        status: int = 200) -> Response:
    try:
        found = await console.service.mailbox(console.actor, address)
        keys = await console.service.keys(console.actor, mailbox=address)
    except REFUSALS as exc:
        return _refused(console, exc)
    # the password its users still log in with (one live legacy password per mailbox)
    legacy = next((k for k in keys if k.legacy and k.mailbox == found.address and k.status != "revoked"),
                  None)
    ended = legacy is not None and legacy.expires is not None and legacy.expires <= time.time()
    return page(console.request, "mailbox.html", status, mailbox=found, keys=keys, legacy=legacy,
                legacy_ended=ended, error=error)


@router.post("/mailboxes/{address}/suspend")
async def suspend_mailbox(request: Request, address: str) -> Response:
    console, form = await posted(request)
    reason = str(form.get("reason") or "").strip() or None
    return await _act(
        console, lambda: console.service.suspend_mailbox(console.actor, address, reason=reason),
        done=f"/mailboxes/{segment(address)}", said=f"Mailbox {address} suspended.",
        back=lambda msg, status: _mailbox_page(console, address, msg, status))


@router.post("/mailboxes/{address}/resume")
async def resume_mailbox(request: Request, address: str) -> Response:
    console, _ = await posted(request)
    return await _act(
        console, lambda: console.service.resume_mailbox(console.actor, address),
        done=f"/mailboxes/{segment(address)}", said=f"Mailbox {address} resumed.",
        back=lambda msg, status: _mailbox_page(console, address, msg, status))


# ------------------------------------------------------------------ key search

@router.get("/keys")
async def keys(request: Request) -> Response:
    console = await open_console(request)
    params = request.query_params
    q = params.get("q", "").strip()
    owner = params.get("owner", "").strip()
    workspace_name = params.get("workspace", "").strip()
    status = params.get("status", "").strip()
    report = params.get("report", "")
    kind = params.get("kind", "").strip()
    try:
        found = await console.service.keys(
            console.actor, search=q or None, owner=owner or None,
            workspace=workspace_name or None, status=status or None,
            unused_for=UNUSED if report == "unused" else None,
            not_rotated_for=ROTATION_DUE if report == "rotation" else None, kind=kind or None)
        workspaces_seen = await console.service.workspaces(console.actor)
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(request, "keys.html", keys=found, workspaces=workspaces_seen, owner=owner,
                workspace_name=workspace_name, key_status=status, report=report, kind=kind)


# ------------------------------------------------------------------ create key

@router.get("/keys/new")
async def new_key(request: Request) -> Response:
    console = await open_console(request)
    params = request.query_params
    values: dict[str, object] = dict.fromkeys(KEY_FIELDS, "")
    values["permissions"] = ["email.send"]
    return await _new_key_page(console, mailbox=params.get("mailbox"), workspace=params.get("workspace"),
                               values=values)


async def _new_key_page(
    console: Console, *, mailbox: str | None, workspace: str | None, values: dict[str, object],
    error: str | None = None, status: int = 200,
) -> Response:
    try:
        if not console.can_edit:
            raise Forbidden(f"creating a key needs the editor role; this is {console.actor.role}")
        if mailbox:
            target = f"mailbox {(await console.service.mailbox(console.actor, mailbox)).address}"
        elif workspace:
            target = f"workspace {(await console.service.workspace(console.actor, workspace)).name}"
        else:
            raise StoreError("a key is for one mailbox or one workspace: open one and choose New key")
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(console.request, "key_form.html", status, mode="create", target=target,
                mailbox=mailbox or "", workspace=workspace or "", values=values,
                permissions=PERMISSIONS, routes=console.service.route_names, error=error)


@router.post("/keys/new")
async def create_key(request: Request) -> Response:
    console, form = await posted(request)
    mailbox_address = str(form.get("mailbox") or "") or None
    workspace_name = None if mailbox_address else (str(form.get("workspace") or "") or None)
    values: dict[str, object] = {name: str(form.get(name) or "") for name in KEY_FIELDS}
    values["permissions"] = [str(p) for p in form.getlist("permissions")]
    try:
        settings = KeyForm.read(form)
        key, secret = await console.service.create_key(
            console.actor, name=str(values["name"]), mailbox=mailbox_address, workspace=workspace_name,
            owner=settings.owner, note=settings.note, permissions=form.getlist("permissions"),
            expires=settings.expires, route=settings.route, rate_limit=settings.rate_limit,
            allow_from=settings.allow_from)
    except REFUSALS as exc:
        return await _new_key_page(console, mailbox=mailbox_address, workspace=workspace_name,
                                   values=values, error=str(exc), status=status_of(exc))
    console.session.reveal[key.id] = (secret, "created")
    return _see_other(f"/keys/{key.id}/secret")


@router.post("/keys/{key_id}/convert")
async def convert_legacy(request: Request, key_id: str) -> Response:
    """A legacy password's mailbox gets a key (the CLI's `legacy convert`); its secret on
    the page of a new key's. The password works on until the key's first login."""
    console, form = await posted(request)
    name = str(form.get("name") or "").strip() or "converted from legacy password"
    try:
        legacy = await console.service.key(console.actor, key_id)
        _need_editor(console, "converting a legacy password")
        if not legacy.legacy or legacy.mailbox is None:
            raise StoreError(f"{key_id} is an auth key, not a legacy password: a key is rotated, "
                             "not converted")
        if legacy.status == "revoked":
            raise Conflict(f"this legacy password of {legacy.mailbox} is retired: nothing to convert")
        _, key, secret = await console.service.convert_legacy(console.actor, legacy.mailbox, name=name)
    except REFUSALS as exc:
        return await _key_page(console, key_id, str(exc), status_of(exc))
    console.session.reveal[key.id] = (secret, "converted")
    return _see_other(f"/keys/{key.id}/secret")


@router.get("/keys/{key_id}/secret")
async def key_secret(request: Request, key_id: str) -> Response:
    """The one showing of a new or rotated key's secret, with the SMTP settings."""
    console = await open_console(request)
    shown = console.session.reveal.pop(key_id, None)
    if shown is None:
        console.session.say("A key's secret is shown once only, when it is created or rotated. "
                            "Rotate the key to get a new one.", "warn")
        return _see_other(f"/keys/{key_id}")
    secret, how = shown
    try:
        key = await console.service.key(console.actor, key_id)
        if key.mailbox:
            usernames = [key.mailbox]
        else:
            usernames = [m.address for m in await console.service.mailboxes(console.actor, key.workspace)
                         if m.status == "active"]
    except REFUSALS as exc:
        return _refused(console, exc)
    site = request.app.state.site
    return page(request, "secret.html", key=key, secret=secret, how=how, usernames=usernames,
                site=site)


# --------------------------------------------------------------------- one key

@router.get("/keys/{key_id}")
async def key_page(request: Request, key_id: str) -> Response:
    console = await open_console(request)
    return await _key_page(console, key_id)


async def _key_page(console: Console, key_id: str, error: str | None = None, status: int = 200) -> Response:
    try:
        key = await console.service.key(console.actor, key_id)
        trail = await console.service.audit(console.actor, key_id=key_id, limit=20)
        replacement = await _replacement(console, key)
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(console.request, "key.html", status, key=key, trail=list(reversed(trail)),
                grace_running=key.previous_valid_until is not None and key.previous_valid_until > time.time(),
                replacement=replacement, error=error)


async def _replacement(console: Console, key: AuthKey) -> AuthKey | None:
    """The key a legacy password was converted to, if it is still there (deleted: None;
    revoked: the password may be converted again)."""
    if not key.legacy or key.replaced_by is None:
        return None
    try:
        return await console.service.key(console.actor, key.replaced_by)
    except NotFound:
        return None


def _key_action(path: str, call: Callable[[Console, str, FormData], Awaitable[object]], said: str) -> None:
    """POST /keys/{id}/<path>: one write, back to the key's page."""

    async def handler(request: Request, key_id: str) -> Response:
        console, form = await posted(request)
        return await _act(console, lambda: call(console, key_id, form), done=f"/keys/{key_id}", said=said,
                          back=lambda msg, status: _key_page(console, key_id, msg, status))

    handler.__name__ = f"key_{path.replace('-', '_')}"
    router.add_api_route(f"/keys/{{key_id}}/{path}", handler, methods=["POST"])


_key_action("disable", lambda c, k, f: c.service.disable_key(c.actor, k),
            "Key disabled: logins with it are refused until it is enabled.")
_key_action("enable", lambda c, k, f: c.service.enable_key(c.actor, k), "Key enabled.")
_key_action("end-grace", lambda c, k, f: c.service.end_rotation_grace(c.actor, k),
            "Rotation grace ended: the previous secret no longer works.")


@router.post("/keys/{key_id}/rotate")
async def rotate_key(request: Request, key_id: str) -> Response:
    console, form = await posted(request)
    try:
        key, secret = await console.service.rotate_key(console.actor, key_id, grace=grace_seconds(form))
    except REFUSALS as exc:
        return await _key_page(console, key_id, str(exc), status_of(exc))
    console.session.reveal[key.id] = (secret, "rotated")
    return _see_other(f"/keys/{key.id}/secret")


@router.get("/keys/{key_id}/revoke")
async def confirm_revoke(request: Request, key_id: str) -> Response:
    console = await open_console(request)
    try:
        key = await console.service.key(console.actor, key_id)
        _need_editor(console, "revoking a key")
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(request, "revoke.html", key=key)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    console, _ = await posted(request)
    return await _act(console, lambda: console.service.revoke_key(console.actor, key_id),
                      done=f"/keys/{key_id}", said="Key revoked: it will never log in again.",
                      back=lambda msg, status: _key_page(console, key_id, msg, status))


@router.post("/keys/{key_id}/delete")
async def delete_key(request: Request, key_id: str) -> Response:
    console, form = await posted(request)
    try:
        key = await console.service.delete_key(console.actor, key_id, confirm=str(form.get("confirm") or ""))
    except REFUSALS as exc:
        return await _key_page(console, key_id, str(exc), status_of(exc))
    console.session.say(f"Key {key.name!r} ({key.id}) deleted.")
    return _see_other(_where(key))


@router.get("/keys/{key_id}/edit")
async def edit_key(request: Request, key_id: str) -> Response:
    console = await open_console(request)
    try:
        key = await console.service.key(console.actor, key_id)
        _need_editor(console, "changing a key")
    except REFUSALS as exc:
        return _refused(console, exc)
    values = {"owner": key.owner or "", "note": key.note or "", "route": key.route or "",
              "rate_limit": "" if key.rate_limit is None else str(key.rate_limit),
              "expires": expiry_text(key), "allow_from": networks_text(key)}
    return _edit_page(console, key, values)


def _edit_page(console: Console, key: AuthKey, values: dict[str, object], error: str | None = None,
               status: int = 200) -> Response:
    return page(console.request, "key_form.html", status, mode="edit", key=key,
                target=key.mailbox and f"mailbox {key.mailbox}" or f"workspace {key.workspace}",
                values=values, permissions=PERMISSIONS, routes=console.service.route_names,
                mailbox="", workspace="", error=error)


@router.post("/keys/{key_id}/edit")
async def save_key(request: Request, key_id: str) -> Response:
    console, form = await posted(request)
    values = {name: str(form.get(name) or "") for name in
              ("owner", "note", "expires", "route", "rate_limit", "allow_from")}
    try:
        key = await console.service.key(console.actor, key_id)
    except REFUSALS as exc:
        return _refused(console, exc)
    try:
        changes = KeyForm.read(form).changes_from(key, form)
        if not changes:
            raise StoreError("nothing changed")
        await console.service.update_key(console.actor, key_id, changes)
    except REFUSALS as exc:
        return _edit_page(console, key, values, str(exc), status_of(exc))
    console.session.say("Key saved: " + ", ".join(name.replace("_", " ") for name in changes) + ".")
    return _see_other(f"/keys/{key_id}")


# ----------------------------------------------------------------------- audit

@router.get("/audit")
async def audit(request: Request) -> Response:
    console = await open_console(request)
    key_id = request.query_params.get("key", "").strip() or None
    mailbox_address = request.query_params.get("mailbox", "").strip() or None
    try:
        trail = await console.service.audit(console.actor, key_id=key_id, mailbox=mailbox_address, limit=500)
    except REFUSALS as exc:
        return _refused(console, exc)
    return page(request, "audit.html", trail=list(reversed(trail)), key_id=key_id or "",
                mailbox=mailbox_address or "")
