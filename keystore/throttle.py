"""The brute-force brake for logins, shared by SMTP AUTH (relay/auth.py) and the admin
HTTP API's bearer tokens (keystore/http/auth.py): one implementation, so both count the
same way and a fix reaches both.

It counts failures within a sliding `window` per client network (`client_network`: an
IPv4 address, or an IPv6 /64). Three counters:

* failures per (network, username): `max_failures`, the small budget; past it that
  username from that network is refused without checking anything.
* failures per network: the ceiling (`max_failures_per_address`, default 10 x
  max_failures). A network over it is not shut out: usernames that failed from it are
  refused, a username that has not gets one check, answered slowly (`delay_for`). So a
  valid credential of someone else behind the same shared address still works.
* right secrets on unusable records, per (network, key id): `max_failures` again (only
  the record's holder makes these, so they never count against the network or username).

Every count is reserved before the check is made and given back when the login succeeds,
so any number of concurrent attempts make at most the budget's worth of checks. The
relay's [auth] settings size it for both users.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict, deque

from keystore.models import canonical_address

__all__ = ["FAILURE_CEILING_DELAY", "FAILURE_FLOOR", "Attempt", "FailureLimiter", "client_network"]

# Every refused login takes at least this long. The keystore's work differs by some tens
# of microseconds between an unknown mailbox, an unknown key and a wrong secret (index
# lookups, not the comparison); padding refusals to a floor far above that leaves nothing
# to measure, and costs a legitimate client nothing (successful logins are not padded).
FAILURE_FLOOR = 0.01
# The slowest a refusal is answered: past half a username's budget, and always for an
# address over its ceiling.
FAILURE_CEILING_DELAY = 2.0

def client_network(host: str) -> str:
    """What "one client" means for every per-client limit (relay/clientaddr.py says why):
    "192.0.2.7" -> "192.0.2.7"; "2001:db8:1:2::5" -> "2001:db8:1:2::/64"; an IPv4-mapped
    IPv6 address counts as its IPv4 address; anything that is not an IP address (a Unix
    socket's name) is its own unit."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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

    def retry_after(self, client_ip: str, username: str) -> int:
        """Whole seconds after which `username` from `client_ip`, refused now, is surely
        checked again: when its newest counted failure leaves the window (an empty counter
        is never refused, whatever the address's). For a Retry-After header."""
        window = self._windows.get(("user", client_network(client_ip), canonical_address(username)[:320]))
        if window is None or not window.times:
            return 1
        return max(1, math.ceil(window.times[-1] + self.window - time.monotonic()))

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
