"""The mail log: one line per event, for operators, log shippers and fail2ban.

Every event is one record on the `relay.mail` logger whose message is the event name
followed by `key=value` fields in a fixed order, e.g.::

    auth_failed session=k3f9a2c1d0 client=192.0.2.7 tls=TLSv1.3 username=bob@example.com reason=revoked

The record also carries `event` (the name) and `fields` (a dict, values as numbers where
they are numbers) so the JSON format (relay/logformat.py) writes the same fields as keys.

Quoting, one rule everywhere: a value made only of printable ASCII other than space, `"`,
`=` and `\\` is written bare; any other value (empty, with a space, a quote, an `=`, a
control or non-ASCII character) is written as a JSON string: double quotes, `\\"` and
`\\\\` escaped, control and other unprintable characters as `\\n`, `\\t` or `\\uXXXX`. A
missing value is `-`. Durations are seconds with three decimals. So a line splits on
spaces outside double quotes, each part on its first `=`, and a quoted value is read
with any JSON parser; nothing a client sends can start a new line or forge a field.

Events and their fields (the README's "Logs" section lists the same; both are stable):

=========== ======================================================================
connect     session client port listener            (listener: submission | submissions)
tls         session client version cipher
tls_failed  session client port listener error
refused     client port listener reason              (reason: max_connections | per_address)
auth_ok     session client tls mailbox key [legacy] (legacy=yes: an imported password, issue 13)
auth_failed session client tls username reason
rejected    session client tls key code reply
queued      session client tls id key mailbox from rcpts size
disconnect  session client duration messages
sent, deferred, bounced
            id key mailbox to upstream attempt delay code reply
provider_down, provider_probe_failed
            upstream failures backoff reply    (backoff: seconds until the probe)
provider_up upstream down_for failures
=========== ======================================================================

`session` is a short id given to each SMTP connection when it starts (RelaySMTP); every
line about that connection carries it, so `grep session=k3f9a2c1d0` shows the session.
Lines logged from inside a session's task find it in a context variable (`enter`), so
callers such as relay/auth.py need not pass it. `sent`/`deferred`/`bounced` are one line
per recipient per attempt, tied to `queued` by `id`.

Secrets: callers pass key ids and addresses, but a username (and an address, a reply) is
whatever a client or an upstream typed, and clients do type their key there. Every value
goes through `redact`: a key-shaped string becomes `rak_<id>_…`, and a base64 blob that
decodes to one (an AUTH PLAIN or LOGIN answer in the wrong place) becomes `[redacted]`.
The KeyRedactor filter does the same for every other line, whichever library wrote it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keystore.keys import KEY_PREFIX, redact_keys
from relay import replies

if TYPE_CHECKING:
    from relay.delivery.courier import Outcome
    from relay.queue.model import Delivery, QueueItem

__all__ = [
    "EVENTS",
    "KeyRedactor",
    "SessionLog",
    "attempt",
    "auth_failed",
    "auth_ok",
    "client_address",
    "connected",
    "current_session",
    "disconnected",
    "enter",
    "format_value",
    "proxy_refused",
    "queued",
    "redact",
    "refused",
    "rejected",
    "tls_established",
    "tls_failed",
]

log = logging.getLogger("relay.mail")

# The field names of each event, in the order they are written (README "Logs").
_SESSION = ("session", "client", "tls")
EVENTS: dict[str, tuple[str, ...]] = {
    "connect": ("session", "client", "port", "listener"),
    "tls": ("session", "client", "version", "cipher"),
    "tls_failed": ("session", "client", "port", "listener", "error"),
    "refused": ("client", "port", "listener", "reason"),
    "auth_ok": (*_SESSION, "mailbox", "key"),
    "auth_failed": (*_SESSION, "username", "reason"),
    "rejected": (*_SESSION, "key", "code", "reply"),
    "queued": (*_SESSION, "id", "key", "mailbox", "from", "rcpts", "size"),
    "disconnect": ("session", "client", "duration", "messages"),
    **{name: ("id", "key", "mailbox", "to", "upstream", "attempt", "delay", "code", "reply")
       for name in ("sent", "deferred", "bounced")},
    "provider_down": ("upstream", "failures", "backoff", "reply"),
    "provider_probe_failed": ("upstream", "failures", "backoff", "reply"),
    "provider_up": ("upstream", "down_for", "failures"),
}
# Fields written only when given, after the event's own: `legacy=yes` on the auth_ok of a
# login with an imported password (issue 13); a key's auth_ok line stays as it was.
_OPTIONAL: dict[str, tuple[str, ...]] = {"auth_ok": ("legacy",)}


# ------------------------------------------------------------------ redaction

def _base64_cores(word: bytes) -> list[str]:
    """The base64 characters `word` fixes whatever bytes surround it, at each of the three
    alignments a 3-byte group allows (e.g. "cmFrX" for "rak_" at the start of a group)."""
    cores = []
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + word + bytes(3)).decode()
        first, last = 8 * offset, 8 * (offset + len(word)) - 1
        fixed = [i for i in range(len(encoded)) if 6 * i >= first and 6 * i + 5 <= last]
        cores.append(encoded[fixed[0]:fixed[-1] + 1])
    return cores


_PREFIX = KEY_PREFIX.encode()
# A base64 (or base64url) run holding the encoding of the key prefix at any alignment,
# matched without regard to case: aiosmtpd upper-cases a command word it logs and echoes.
_B64_CORE = re.compile("|".join(_base64_cores(_PREFIX) + _base64_cores(_PREFIX.upper())), re.IGNORECASE)
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{5,}={0,2}")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with every key secret hidden: a key-shaped string becomes `rak_<id>_…`, and a
    base64 run that may encode a key (an AUTH answer sent where a command was due, a
    username the client base64-encoded twice) becomes `[redacted]`."""
    text = redact_keys(text)
    if _B64_CORE.search(text) is None:
        return text
    return _B64_RUN.sub(lambda m: REDACTED if _B64_CORE.search(m.group()) else m.group(), text)


class KeyRedactor(logging.Filter):
    """On a log handler: every record leaves with its secrets redacted (`redact`), in its
    message, its exception and stack text and its event fields, whichever library wrote
    it (aiosmtpd logs command lines, undecodable AUTH answers and unknown commands)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True


# ------------------------------------------------------------------ values

_BARE = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space, ", =, backslash


def format_value(value: object) -> str:
    """One value as the text format writes it (see the module docstring)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    quoted = json.dumps(text, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    return "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in quoted)


def client_address(peer: object) -> str:
    """The client's address as logged: the host of a (host, port) peer."""
    host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
    # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; fail2ban bans a.b.c.d
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _code(reply: str | None) -> int | None:
    head = (reply or "")[:3]
    return int(head) if len(head) == 3 and head.isdigit() else None


def _emit(level: int, event: str, values: dict[str, object]) -> None:
    fields = {name: values.get(name) for name in EVENTS[event]}
    fields.update((name, values[name]) for name in _OPTIONAL.get(event, ()) if values.get(name) is not None)
    fields = {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}
    line = " ".join([event, *(f"{k}={format_value(v)}" for k, v in fields.items())])
    log.log(level, "%s", line, extra={"event": event, "fields": fields})


# ------------------------------------------------------------------ sessions

@dataclass(eq=False, slots=True)
class SessionLog:
    """What the log says about one SMTP connection: its id, client and TLS, and what the
    `disconnect` line sums up."""

    client: str
    port: int | None
    listener: str
    id: str = field(default_factory=lambda: secrets.token_hex(5))
    started: float = field(default_factory=time.monotonic)
    tls: str | None = None
    messages: int = 0
    ended: bool = False


# (session, the session's task): a task the session starts (a delivery scheduled by its
# DATA) inherits the context, but is not the session, and must not log as it.
_current: ContextVar[tuple[SessionLog, object] | None] = ContextVar("relay_session", default=None)


def enter(session: SessionLog) -> None:
    """Tie what the current task logs from now on to `session` (called in the session's
    own task: each task has its own context, so sessions never see each other's)."""
    current = _current.get()
    if current is None or current[0] is not session:
        _current.set((session, asyncio.current_task()))


def current_session() -> SessionLog | None:
    """The session the running task serves, if it is a session's task."""
    current = _current.get()
    if current is None:
        return None
    try:
        task = asyncio.current_task()
    except RuntimeError:  # a thread: no task
        return None
    return current[0] if task is current[1] else None


def _in_session(peer: object) -> dict[str, object]:
    session = current_session()
    if session is None:
        return {"client": client_address(peer)}
    return {"session": session.id, "client": client_address(peer), "tls": session.tls}


def connected(session: SessionLog) -> None:
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "connect", {"session": session.id, "client": session.client,
                                        "port": session.port, "listener": session.listener})


def tls_established(session: SessionLog, version: str | None, cipher: str | None) -> None:
    session.tls = version
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "tls", {"session": session.id, "client": session.client,
                                    "version": version, "cipher": cipher})


def tls_failed(session: SessionLog | None, peer: object, port: int | None, listener: str,
               error: object) -> None:
    """A handshake that failed: a client that says STARTTLS and then no TLS, or a scanner
    on the implicit-TLS port (where no session has started yet)."""
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "tls_failed", {
            "session": session.id if session else None, "client": client_address(peer), "port": port,
            "listener": listener, "error": error if isinstance(error, str) else repr(error)})


_REFUSALS = {replies.TOO_MANY_CONNECTIONS: "max_connections", replies.TOO_MANY_FROM_ADDRESS: "per_address"}


def refused(peer: object, port: int | None, listener: str, reply: str) -> None:
    """A connection turned away by a connection cap with `reply`, before any session:
    reason=max_connections (all listeners) or per_address (this client's address)."""
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "refused", {"client": client_address(peer), "port": port, "listener": listener,
                                        "reason": _REFUSALS.get(reply, "other")})


def proxy_refused(peer: object, port: int | None, reason: str, listener: str = "submission") -> None:
    """A connection to a listener behind a load balancer closed before any greeting (on
    implicit TLS, before any handshake): reason=not_a_proxy (its TCP peer is not in
    [server] proxy_from) or proxy_header (no valid PROXY v2 header came)."""
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "refused", {"client": client_address(peer), "port": port,
                                        "listener": listener, "reason": reason})


def disconnected(session: SessionLog) -> None:
    """The connection of a started session closed (written once, however it ended)."""
    if session.ended:
        return
    session.ended = True
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "disconnect", {
            "session": session.id, "client": session.client,
            "duration": round(time.monotonic() - session.started, 3), "messages": session.messages})


# ------------------------------------------------------------------ SMTP events

def auth_ok(peer: object, username: str, key_id: str, *, legacy: bool = False) -> None:
    if log.isEnabledFor(logging.INFO):
        fields = {**_in_session(peer), "mailbox": username, "key": key_id}
        if legacy:  # an imported password (issue 13): who still logs in without a key
            fields["legacy"] = "yes"
        _emit(logging.INFO, "auth_ok", fields)


NOT_AN_ADDRESS = "(not an address)"


def auth_failed(peer: object, username: str, reason: str) -> None:
    # username is what the client typed: it helps spot typos, but may be a secret when the
    # fields were swapped. A key is recognised and cut (`rak_<id>_…`); a legacy password
    # (issue 13) cannot be, so a username without an @ is not written at all.
    if log.isEnabledFor(logging.WARNING):
        shown = username[:256] if "@" in username or username.lower().startswith(KEY_PREFIX) \
            else NOT_AN_ADDRESS
        _emit(logging.WARNING, "auth_failed", {**_in_session(peer), "username": shown,
                                                "reason": reason})


def rejected(peer: object, key_id: str | None, reply: str) -> None:
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "rejected", {**_in_session(peer), "key": key_id, "code": _code(reply),
                                         "reply": reply})


def queued(peer: object, item: QueueItem) -> None:
    """A message accepted (250): counted for the session's `disconnect` line."""
    session = current_session()
    if session is not None:
        session.messages += 1
    if log.isEnabledFor(logging.INFO):
        _emit(logging.INFO, "queued", {
            **_in_session(peer), "id": item.id, "key": item.key_id, "mailbox": item.mailbox,
            "from": f"<{item.mail_from}>", "rcpts": len(item.recipients), "size": len(item.body)})


_ATTEMPT_WORDS = {"sent": "sent", "deferred": "deferred", "failed": "bounced"}


def attempt(item: Delivery, rcpt: str, upstream: str, outcome: Outcome, *, delay: float) -> None:
    """One line per recipient per attempt: sent, deferred (will retry) or bounced. `delay`
    is the message's age in seconds when the attempt started."""
    level = logging.INFO if outcome.status == "sent" else logging.WARNING
    if log.isEnabledFor(level):
        _emit(level, _ATTEMPT_WORDS[outcome.status], {
            "id": item.id, "key": item.key_id, "mailbox": item.mailbox, "to": f"<{rcpt}>",
            "upstream": upstream, "attempt": item.attempts + 1, "delay": round(delay, 3),
            "code": _code(outcome.reply), "reply": outcome.reply})


def provider_down(upstream: str, failures: int, backoff: float, reply: str) -> None:
    """A smarthost marked down after `failures` session-level failures in a row (WARNING);
    `backoff` is the seconds until one delivery probes it."""
    _emit(logging.WARNING, "provider_down", {
        "upstream": upstream, "failures": failures, "backoff": round(backoff, 3), "reply": reply})


def provider_probe_failed(upstream: str, failures: int, backoff: float, reply: str) -> None:
    _emit(logging.INFO, "provider_probe_failed", {
        "upstream": upstream, "failures": failures, "backoff": round(backoff, 3), "reply": reply})


def provider_up(upstream: str, down_for: float, failures: int) -> None:
    _emit(logging.INFO, "provider_up", {"upstream": upstream, "down_for": round(down_for, 3),
                                        "failures": failures})
