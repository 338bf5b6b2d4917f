"""Console sessions: a random id in a cookie, everything else in this process's memory.

A session remembers which admin token logged in (its id, never its secret), its own CSRF
token and when it ends. Each request looks the token up again (`SessionStore.actor`), so
revoking a token ends every session made with it at that session's next request, and a
token's role or workspaces follow the token rather than the moment of login. Sessions die
with the process: after a restart everyone logs in again, which costs a paste.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from keystore.service import Actor, AdminService
from keystore.store import NotFound

__all__ = ["COOKIE", "PRELOGIN_COOKIE", "Session", "SessionStore"]

COOKIE = "keystore_session"
# Before login there is no session: the login form's CSRF token is double-submitted, the
# same random value in this cookie and in the form (OWASP: login CSRF).
PRELOGIN_COOKIE = "keystore_login"
MAX_SESSIONS = 10_000  # only successful logins make one; past this, see SessionStore.create


@dataclass(slots=True)
class Session:
    id: str
    token_id: str
    csrf: str
    expires: float  # time.monotonic() deadline
    flash: list[tuple[str, str]] = field(default_factory=list)  # (kind, text) shown once
    # key id -> (its full secret, "created" | "rotated"): held from the POST that made it
    # to the one page that shows it (POST, redirect, GET: a reload cannot make a second
    # key), then forgotten
    reveal: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)

    def say(self, text: str, kind: str = "ok") -> None:
        """A message for the next page this session sees (after a redirect)."""
        self.flash.append((kind, text))

    def take_flash(self) -> list[tuple[str, str]]:
        messages, self.flash = self.flash, []
        return messages


class SessionStore:
    """The sessions of one console (one app), by id."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}

    def create(self, token_id: str) -> Session:
        self._purge()
        while len(self._sessions) >= MAX_SESSIONS:
            # full: a token's new login pushes out that token's oldest session (the oldest of
            # all only for a token holding none), so one token logging in over and over, a
            # viewer's too, cannot log everyone else out
            own = next((sid for sid, s in self._sessions.items() if s.token_id == token_id), None)
            self._sessions.pop(own if own is not None else next(iter(self._sessions)))
        session = Session(id=secrets.token_urlsafe(32), token_id=token_id,
                          csrf=secrets.token_urlsafe(32), expires=time.monotonic() + self.ttl)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id, or None (unknown, or its time is up)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def end_token(self, token_id: str) -> None:
        for sid in [s.id for s in self._sessions.values() if s.token_id == token_id]:
            del self._sessions[sid]

    async def actor(self, session: Session, service: AdminService) -> Actor | None:
        """The actor the session's token stands for now, or None once the token is revoked
        or gone (the session is then ended)."""
        try:
            token = await service.store.get_token(session.token_id)
        except NotFound:
            token = None
        if token is None or token.status != "active":
            self.end_token(session.token_id)
            return None
        return Actor.from_token(token)

    def _purge(self) -> None:
        now = time.monotonic()
        for sid in [s.id for s in self._sessions.values() if s.expires <= now]:
            del self._sessions[sid]
