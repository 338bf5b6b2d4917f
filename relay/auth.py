"""Authentication as the SMTP side sees it: SASL payloads, brute-force brakes, and turning
the keystore's verdict into the reply the client gets.

The keystore decides; this module only decides what to say and when to stop listening.
Unknown mailbox, unknown key and wrong secret are one reply (`535 5.7.8 Authentication
credentials invalid`): the keystore makes them cost the same, and nothing here branches
on which it was.

The throttle (FailureLimiter) counts within a sliding `failure_window`, per client
address: an IPv4 address, or an IPv6 /64 (one subscriber's prefix; its hosts pick any
address in it at will). Three counters:

* wrong secrets per (address, username): `max_failures`, the small budget. Past it that
  username from that address gets `421 4.7.0`. Unknown mailboxes and wrong secrets count
  alike, so a blocked username says nothing about whether it exists.
* wrong secrets per address: `max_failures_per_address`, the ceiling. An address over it
  (a sprayer, or a shared egress address of a CRM with several stale customer keys) is
  not shut out: usernames that have failed from it are refused without asking the
  keystore, and a username that has not failed from it gets one check, answered slowly.
  So a valid key of another mailbox behind the same address still logs in, and a sprayer
  gets one guess per username at a slow pace (a 256-bit secret is not guessed that way).
* right secrets on unusable keys (revoked, disabled, expired, suspended, no email.send,
  not allowed from the client's address), per (address, key id): `max_failures` again.
  Only the key's holder can make these, so they never count against the address or the
  username.

Every count is reserved before the keystore is asked, and given back when the login
succeeds: any number of concurrent AUTHs make at most the budget's worth of checks. An
AUTH abandoned mid-check (the client went away) counts as failed.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from keystore import keys
from keystore.models import Identity, Reason, canonical_address
from keystore.store import KeyStore, KeystoreUnavailable
from relay import maillog, replies
from relay.clientaddr import client_network
from relay.metrics import Metrics

__all__ = [
    "FAILURE_FLOOR", "Attempt", "Authenticator", "FailureLimiter", "LoginResult", "client_network",
    "split_plain",
]

# Every refused login takes at least this long. The keystore's work differs by some tens
# of microseconds between an unknown mailbox, an unknown key and a wrong secret (index
# lookups, not the comparison); padding refusals to a floor far above that leaves nothing
# to measure, and costs a legitimate client nothing (successful logins are not padded).
FAILURE_FLOOR = 0.01
# The slowest a refusal is answered: past half a username's budget, and always for an
# address over its ceiling.
FAILURE_CEILING_DELAY = 2.0


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


class _Window:
    """Failure times within the window, plus reservations whose outcome is not known yet."""

    __slots__ = ("pending", "slot", "times")

    def __init__(self, slot: tuple[str, str, str], size: int) -> None:
        self.slot = slot
        self.times: deque[float] = deque(maxlen=size)
        self.pending = 0

    @property
    def failures(self) -> int:
        return len(self.times)


class Attempt:
    """One login's reservation in the FailureLimiter; settle it exactly once."""

    __slots__ = ("_key", "_limiter", "_net", "_settled", "_user")

    def __init__(self, limiter: FailureLimiter, user: _Window, net: _Window, key: _Window | None) -> None:
        self._limiter, self._user, self._net, self._key = limiter, user, net, key
        self._settled = False
        for window in self._windows():
            window.pending += 1

    def _windows(self) -> list[_Window]:
        return [w for w in (self._user, self._net, self._key) if w is not None]

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        for window in self._windows():
            window.pending -= 1
        self._limiter.settled(self._windows())
        return True

    def release(self) -> None:
        """Not a failure: the login succeeded, or the keystore could not be asked."""
        self._settle()

    def failed(self) -> float:
        """A wrong secret (or a malformed exchange): counts against the username and the
        address. Returns how long to wait before answering."""
        if self._settled:
            return 0.0
        now = time.monotonic()
        self._user.times.append(now)
        self._net.times.append(now)
        self._settle()
        return self._limiter.delay_for(self._user, self._net)

    def unusable(self) -> float:
        """A right secret on an unusable key: counts against that key only."""
        if self._settled:
            return 0.0
        if self._key is not None:
            self._key.times.append(time.monotonic())
        self._settle()
        return FAILURE_FLOOR


_WAIT = object()  # FailureLimiter._decide: a check in flight may use up the budget; wait for it


class FailureLimiter:
    """The AUTH throttle described in the module docstring.

    A login may only be checked while the failures already counted plus the checks in
    flight fit the budget; otherwise it waits for one in flight to end (a success gives
    its place back), and is refused once the counted failures alone fill the budget.

    Memory is bounded: past `max_entries` counters the least recently used are forgotten
    (an attempt in flight keeps its own counters, so forgetting never goes negative).
    """

    def __init__(
        self, max_failures: int, window: float, *, max_failures_per_address: int | None = None,
        max_entries: int = 100_000,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.max_failures = max_failures
        self.address_ceiling = max_failures_per_address or 10 * max_failures
        self.window = window
        self._max_entries = max_entries
        self._windows: OrderedDict[tuple[str, str, str], _Window] = OrderedDict()
        self._settled: asyncio.Event | None = None

    def __len__(self) -> int:
        """Counters held (each a few hundred bytes): for tests and a bench."""
        return len(self._windows)

    def _get(self, slot: tuple[str, str, str], horizon: float) -> _Window | None:
        window = self._windows.get(slot)
        if window is None:
            return None
        times = window.times
        while times and times[0] <= horizon:
            times.popleft()
        if not times and not window.pending:
            del self._windows[slot]
            return None
        self._windows.move_to_end(slot)
        return window

    def _make(self, slot: tuple[str, str, str], size: int) -> _Window:
        window = self._windows[slot] = _Window(slot, size)
        while len(self._windows) > self._max_entries:
            self._windows.popitem(last=False)
        return window

    async def reserve(self, client_ip: str, username: str, key_id: str | None = None) -> Attempt | None:
        """A reservation for one keystore check, or None: refuse without asking."""
        while True:
            decision = self._decide(client_ip, username, key_id)
            if decision is not _WAIT:
                return decision  # type: ignore[return-value]
            if self._settled is None:
                self._settled = asyncio.Event()
            await self._settled.wait()

    def settled(self, windows: list[_Window]) -> None:
        """An attempt settled: counters left empty (a success) are dropped at once, so
        successful logins cost no memory, and logins waiting for a place decide again."""
        for window in windows:
            if not window.times and not window.pending and self._windows.get(window.slot) is window:
                del self._windows[window.slot]
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def _decide(self, client_ip: str, username: str, key_id: str | None) -> Attempt | object | None:
        """Synchronous, so nothing slips in between the decision and the reservation."""
        horizon = time.monotonic() - self.window
        net = client_network(client_ip)
        user_slot = ("user", net, canonical_address(username)[:320])
        net_slot = ("net", net, "")
        key_slot = ("key", net, key_id) if key_id else None
        user = self._get(user_slot, horizon)
        address = self._get(net_slot, horizon)
        key = self._get(key_slot, horizon) if key_slot else None
        if user is not None and user.failures >= self.max_failures:
            return None
        if key is not None and key.failures >= self.max_failures:
            return None
        if address is not None and address.failures >= self.address_ceiling and user is not None:
            # over the ceiling: a username that failed here is refused; one being checked
            # may be about to fail
            return None if user.failures else _WAIT
        if user is not None and user.failures + user.pending >= self.max_failures:
            return _WAIT
        if key is not None and key.failures + key.pending >= self.max_failures:
            return _WAIT
        if user is None:
            user = self._make(user_slot, self.max_failures)
        if address is None:
            address = self._make(net_slot, self.address_ceiling)
        if key is None and key_slot is not None:
            key = self._make(key_slot, self.max_failures)
        return Attempt(self, user, address, key)

    def record_failure(self, client_ip: str, username: str) -> None:
        """A failure no keystore check was made for (a malformed AUTH exchange)."""
        attempt = self._decide(client_ip, username, None)
        if isinstance(attempt, Attempt):
            attempt.failed()

    def delay_for(self, user: _Window, address: _Window) -> float:
        """How long to wait before answering a failure: nothing extra within the first half
        of a username's budget, then 0.2 s more per failure; the most for an address over
        its ceiling."""
        if address.failures >= self.address_ceiling:
            return FAILURE_CEILING_DELAY
        over = user.failures - self.max_failures // 2
        return min(0.2 * over, FAILURE_CEILING_DELAY) if over > 0 else FAILURE_FLOOR


@dataclass(frozen=True, slots=True)
class LoginResult:
    identity: Identity | None
    reply: str
    close: bool = False


class Authenticator:
    def __init__(self, store: KeyStore, limiter: FailureLimiter, *, recheck_interval: float,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._limiter = limiter
        self._recheck_interval = recheck_interval
        self._metrics = metrics or Metrics()
        self._checked: dict[tuple[str, str, bytes, str], tuple[float, Identity | Reason]] = {}

    def set_limits(self, *, max_failures: int, address_ceiling: int, window: float,
                   recheck_interval: float) -> None:
        """A reload: new budgets apply to the next check; failures already counted stay."""
        self._limiter.max_failures = max_failures
        self._limiter.address_ceiling = address_ceiling
        self._limiter.window = window
        self._recheck_interval = recheck_interval

    async def login(self, username: str, secret: str, client_ip: str) -> LoginResult:
        started = time.monotonic()
        parsed = keys.parse_key(secret)  # the public key id: unusable-key logins count against it
        attempt = await self._limiter.reserve(client_ip, username, parsed.key_id if parsed else None)
        if attempt is None:
            maillog.auth_failed(client_ip, username, "too_many_failures")
            self._metrics.auth_outcome("throttled")
            return LoginResult(None, replies.AUTH_TOO_MANY, close=True)
        try:
            verdict = await self._store.authenticate(username, secret, client_ip)
        except KeystoreUnavailable:
            attempt.release()
            maillog.auth_failed(client_ip, username, "keystore_unavailable")
            self._metrics.auth_outcome("keystore_unavailable")
            return LoginResult(None, replies.AUTH_UNAVAILABLE)
        except BaseException:
            attempt.failed()  # abandoned mid-check (the client went away): it still counts
            self._metrics.auth_outcome("abandoned")
            raise
        if isinstance(verdict, Identity):
            attempt.release()
            maillog.auth_ok(client_ip, verdict.mailbox, verdict.key_id)
            self._metrics.auth_outcome("ok", verdict.key_id)
            self._checked[_cache_slot(verdict)] = (time.monotonic(), verdict)
            return LoginResult(verdict, replies.AUTH_OK)
        maillog.auth_failed(client_ip, username, verdict.value)
        # a right secret on an unusable key: the key exists, so its id is no made-up label value
        self._metrics.auth_outcome(verdict.value, None if verdict is Reason.BAD_CREDENTIALS or parsed is None
                                   else parsed.key_id)
        delay = attempt.failed() if verdict is Reason.BAD_CREDENTIALS else attempt.unusable()
        await asyncio.sleep(started + max(delay, FAILURE_FLOOR) - time.monotonic())
        return LoginResult(None, replies.REASON_REPLIES.get(verdict.value, replies.AUTH_INVALID))

    def exchange_failed(self, username: str, client_ip: str) -> None:
        """A malformed AUTH exchange (an overlong line) counts like a wrong secret for the
        username it named, if any, and its address."""
        self._limiter.record_failure(client_ip, username)
        self._metrics.auth_outcome("malformed")

    async def recheck(self, identity: Identity, *, fresh: bool = False) -> Identity | str:
        """The session's identity as it stands now, or the reply refusing it.

        Results are cached for `recheck_interval` so a busy pooled connection costs one
        keystore read per interval, while a revoked key still stops within that interval.
        `fresh=True` reads the keystore whatever the cache holds (the end of DATA: the last
        word before a 250), and refreshes the cache.
        """
        slot = _cache_slot(identity)
        now = time.monotonic()
        cached = self._checked.get(slot)
        if not fresh and cached is not None and now - cached[0] < self._recheck_interval:
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


def _cache_slot(identity: Identity) -> tuple[str, str, bytes, str]:
    """Sessions share a recheck only if they logged in as the same mailbox with the same
    secret from the same address: after a rotation, the old secret's sessions and the new
    one's part ways, and a key's allow-from narrowed ends only the sessions outside it."""
    return identity.key_id, identity.mailbox, identity.secret_hash, identity.client_ip
