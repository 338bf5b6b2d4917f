"""Authentication as the SMTP side sees it: SASL payloads, brute-force brakes, and turning
the keystore's verdict into the reply the client gets.

The keystore decides; this module only decides what to say and when to stop listening.
Unknown mailbox, unknown key and wrong secret are one reply (`535 5.7.8 Authentication
credentials invalid`): the keystore makes them cost the same, and nothing here branches
on which it was.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from keystore.models import Identity, Reason
from keystore.store import KeyStore, KeystoreUnavailable
from relay import maillog, replies

__all__ = ["FAILURE_FLOOR", "Authenticator", "FailureLimiter", "LoginResult", "split_plain"]

# Every refused login takes at least this long. The keystore's work differs by some tens
# of microseconds between an unknown mailbox, an unknown key and a wrong secret (index
# lookups, not the comparison); padding refusals to a floor far above that leaves nothing
# to measure, and costs a legitimate client nothing (successful logins are not padded).
FAILURE_FLOOR = 0.01


def split_plain(blob: bytes) -> tuple[str, str, str] | None:
    """RFC 4616 PLAIN message → (authzid, authcid, passwd), or None if malformed."""
    parts = blob.split(b"\x00")
    if len(parts) != 3:
        return None
    try:
        authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return None
    return authzid, authcid, passwd


class FailureLimiter:
    """Counts failed AUTHs per client address in a sliding window.

    Past half the budget each further failure is answered more slowly; past the budget
    the address gets 421 4.7.0 until its oldest failure leaves the window. Memory is
    bounded: the least recently failing addresses are forgotten first.
    """

    def __init__(self, max_failures: int, window: float, *, max_addresses: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked(self, address: str) -> bool:
        times = self._recent(address, time.monotonic())
        return times is not None and len(times) >= self.max_failures

    def record(self, address: str) -> float:
        """Note a failure; returns how long to wait before answering it."""
        now = time.monotonic()
        times = self._recent(address, now) or deque(maxlen=self.max_failures)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
        over = len(times) - self.max_failures // 2
        return min(0.2 * over, 2.0) if over > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LoginResult:
    identity: Identity | None
    reply: str
    close: bool = False


class Authenticator:
    def __init__(self, store: KeyStore, limiter: FailureLimiter, *, recheck_interval: float) -> None:
        self._store = store
        self._limiter = limiter
        self._recheck_interval = recheck_interval
        self._checked: dict[tuple[str, str], tuple[float, Identity | Reason]] = {}

    async def login(self, username: str, secret: str, client_ip: str) -> LoginResult:
        started = time.monotonic()
        if self._limiter.blocked(client_ip):
            maillog.auth_failed(client_ip, username, "too_many_failures")
            return LoginResult(None, replies.AUTH_TOO_MANY, close=True)
        try:
            verdict = await self._store.authenticate(username, secret, client_ip)
        except KeystoreUnavailable:
            maillog.auth_failed(client_ip, username, "keystore_unavailable")
            return LoginResult(None, replies.AUTH_UNAVAILABLE)
        if isinstance(verdict, Identity):
            maillog.auth_ok(client_ip, verdict.mailbox, verdict.key_id)
            self._checked[(verdict.key_id, verdict.mailbox)] = (time.monotonic(), verdict)
            return LoginResult(verdict, replies.AUTH_OK)
        maillog.auth_failed(client_ip, username, verdict.value)
        delay = max(self._limiter.record(client_ip), FAILURE_FLOOR)
        await asyncio.sleep(started + delay - time.monotonic())
        return LoginResult(None, replies.REASON_REPLIES.get(verdict.value, replies.AUTH_INVALID))

    async def recheck(self, identity: Identity) -> Identity | str:
        """The session's identity as it stands now, or the reply refusing it.

        Results are cached for `recheck_interval` so a busy pooled connection costs one
        keystore read per interval, while a revoked key still stops within that interval.
        """
        slot = (identity.key_id, identity.mailbox)
        now = time.monotonic()
        cached = self._checked.get(slot)
        if cached is not None and now - cached[0] < self._recheck_interval:
            verdict = cached[1]
        else:
            try:
                verdict = await self._store.recheck(identity)
            except KeystoreUnavailable:
                return replies.KEYSTORE_DOWN_AT_MAIL
            if len(self._checked) > 100_000:
                self._checked.clear()
            self._checked[slot] = (now, verdict)
        if isinstance(verdict, Identity):
            return verdict
        return replies.REASON_REPLIES.get(verdict.value, replies.AUTH_INVALID)
