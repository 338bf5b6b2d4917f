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

Several relays (issue 12) share their counted failures through a `ledger`
(keystore/clusterlimits.py; keystore/pglimits.py keeps it in PostgreSQL): `reserve` reads
the cluster's counts for its counters in one round trip and goes by the larger of the
cluster's and this node's own, and every failure is added to it (in the background: the
refusal is padded anyway, and `flush` lets the caller wait for it within that padding).
So a username's budget is the cluster's, not each node's. Reservations (checks in flight)
stay per node: N nodes may have up to N budgets' worth of checks in flight at one
instant, never more failures counted than one budget. A ledger that cannot be asked is
left out (logged once) and the node's own counts hold until it answers again. The admin
API's token logins use no ledger: each `keystore serve` counts its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

from keystore.clusterlimits import FailureLedger, LimitsUnavailable, SlotCount
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
# After the ledger failed to answer, logins go by this node's counts alone for this long
# before it is asked again: a database that hangs must not add its timeout to every login.
LEDGER_RETRY_AFTER = 5.0

log = logging.getLogger("keystore.throttle")

Slot = tuple[str, str, str]  # (kind, client network, name): one counter


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


def slot_digest(slot: Slot, key: bytes = b"") -> bytes:
    """A counter's name in the shared ledger: fixed-size, no username in clear, and keyed
    (keys.ledger_key: from the pepper, the same on every node) so that whoever reads the
    database cannot test a list of usernames and addresses against the names."""
    return hashlib.blake2b("\x00".join(slot).encode("utf-8", "backslashreplace"), digest_size=16,
                           key=key, person=b"keyrelay-authfl").digest()


class _Window:
    """Failure times within the window, plus reservations whose outcome is not known yet;
    `shared` is the cluster's count as last read from the ledger (this node's included),
    `shared_newest` when its newest failure was (time.monotonic() terms)."""

    __slots__ = ("pending", "shared", "shared_newest", "slot", "times")

    def __init__(self, slot: Slot, size: int) -> None:
        self.slot = slot
        self.times: deque[float] = deque(maxlen=size)
        self.pending = 0
        self.shared = 0
        self.shared_newest = 0.0

    @property
    def failures(self) -> int:
        return max(len(self.times), self.shared)

    def add(self, now: float) -> None:
        self.times.append(now)
        if self.shared:  # the cluster's count read before this failure: one more now
            self.shared += 1
            self.shared_newest = now

    def newest(self) -> float | None:
        local = self.times[-1] if self.times else None
        if not self.shared:
            return local
        return self.shared_newest if local is None else max(local, self.shared_newest)


class Attempt:
    """One login's reservation in the FailureLimiter; settle it exactly once."""

    __slots__ = ("_key", "_limiter", "_net", "_settled", "_user", "over_ceiling")

    def __init__(self, limiter: FailureLimiter, user: _Window, net: _Window, key: _Window | None) -> None:
        self._limiter, self._user, self._net, self._key = limiter, user, net, key
        self._settled = False
        # the address was over its ceiling: this is its one check of a new username, which
        # must cost no slow work (a legacy password's hash: relay/auth.py)
        self.over_ceiling = net.failures >= limiter.address_ceiling
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
        self._user.add(now)
        self._net.add(now)
        self._settle()
        self._limiter.share([self._user.slot, self._net.slot])
        return self._limiter.delay_for(self._user, self._net)

    def unusable(self) -> float:
        """A right secret on an unusable key: counts against that key only."""
        if self._settled:
            return 0.0
        if self._key is not None:
            self._key.add(time.monotonic())
        self._settle()
        if self._key is not None:
            self._limiter.share([self._key.slot])
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
        max_entries: int = 100_000, ledger: FailureLedger | None = None, ledger_key: bytes = b"",
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.max_failures = max_failures
        self.address_ceiling = max_failures_per_address or 10 * max_failures
        self.window = window
        self._max_entries = max_entries
        self._windows: OrderedDict[tuple[str, str, str], _Window] = OrderedDict()
        self._settled: asyncio.Event | None = None
        self._ledger = ledger
        self._ledger_key = ledger_key  # names the ledger's counters (slot_digest)
        self._ledger_answers = True  # False from a failed read or write until one works (logged once)
        self._ledger_retry_at = 0.0
        self._writes: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Counters held (each a few hundred bytes): for tests and a bench."""
        return len(self._windows)

    def _get(self, slot: Slot, horizon: float) -> _Window | None:
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

    def _make(self, slot: Slot, size: int) -> _Window:
        window = self._windows[slot] = _Window(slot, size)
        while len(self._windows) > self._max_entries:
            self._windows.popitem(last=False)
        return window

    async def reserve(self, client_ip: str, username: str, key_id: str | None = None) -> Attempt | None:
        """A reservation for one keystore check, or None: refuse without asking."""
        slots = self._slots(client_ip, username, key_id)
        while True:
            shared = await self._shared_counts(slots)
            decision = self._decide(slots, shared)
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

    @staticmethod
    def _slots(client_ip: str, username: str, key_id: str | None) -> tuple[Slot, Slot, Slot | None]:
        net = client_network(client_ip)
        return (("user", net, canonical_address(username)[:320]), ("net", net, ""),
                ("key", net, key_id) if key_id else None)

    def _caps(self, slots: tuple[Slot, Slot, Slot | None]) -> list[tuple[Slot, int]]:
        """Each counter with the most failures the decision ever compares it with."""
        user_slot, net_slot, key_slot = slots
        caps = [(user_slot, self.max_failures), (net_slot, self.address_ceiling)]
        return caps + ([(key_slot, self.max_failures)] if key_slot else [])

    async def _shared_counts(self, slots: tuple[Slot, Slot, Slot | None]) -> dict[Slot, SlotCount] | None:
        """The cluster's counts for these counters (one round trip), or None: no ledger,
        or it cannot be asked now (then this node's own counts decide)."""
        if self._ledger is None or time.monotonic() < self._ledger_retry_at:
            return None
        caps = self._caps(slots)
        by_digest = {slot_digest(slot, self._ledger_key): slot for slot, _ in caps}
        try:
            counts = await self._ledger.counts([(slot_digest(s, self._ledger_key), cap) for s, cap in caps],
                                               self.window)
        except LimitsUnavailable as exc:
            self._ledger_retry_at = time.monotonic() + LEDGER_RETRY_AFTER
            self._ledger_failed(exc)
            return None
        self._ledger_answered()
        return {by_digest[digest]: count for digest, count in counts.items() if digest in by_digest}

    def _ledger_failed(self, exc: LimitsUnavailable) -> None:
        if self._ledger_answers:
            self._ledger_answers = False
            log.warning("AUTH throttle: the cluster's failure counts cannot be used (%s); this node "
                        "counts its own failures alone until they can", exc)

    def _ledger_answered(self) -> None:
        if not self._ledger_answers:
            self._ledger_answers = True
            log.warning("AUTH throttle: the cluster's failure counts are back in use")

    def share(self, slots: Sequence[Slot]) -> None:
        """Add one failure for each of `slots` to the ledger, in the background."""
        if self._ledger is None:
            return
        task = asyncio.get_running_loop().create_task(self._add(slots))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _add(self, slots: Sequence[Slot]) -> None:
        assert self._ledger is not None
        try:
            await self._ledger.add([slot_digest(slot, self._ledger_key) for slot in slots], self.window)
        except LimitsUnavailable as exc:
            self._ledger_failed(exc)
        else:
            self._ledger_answered()

    async def flush(self, timeout: float) -> None:
        """Wait up to `timeout` s for failures still being added to the ledger: a refusal
        answered after this is counted on every node."""
        if self._writes and timeout > 0:
            await asyncio.wait(set(self._writes), timeout=timeout)

    def _decide(self, slots: tuple[Slot, Slot, Slot | None],
                shared: dict[Slot, SlotCount] | None) -> Attempt | object | None:
        """Synchronous, so nothing slips in between the decision and the reservation.
        `shared`: the cluster's counts just read (None: this node's counts alone)."""
        now = time.monotonic()
        horizon = now - self.window
        user_slot, net_slot, key_slot = slots
        user = self._with_shared(user_slot, self.max_failures, horizon, now, shared)
        address = self._with_shared(net_slot, self.address_ceiling, horizon, now, shared)
        key = self._with_shared(key_slot, self.max_failures, horizon, now, shared) if key_slot else None
        if user is not None and user.failures >= self.max_failures:
            return None
        if key is not None and key.failures >= self.max_failures:
            return None
        if address is not None and address.failures >= self.address_ceiling and user is not None:
            # over the ceiling: a username that failed here is refused; one being checked
            # may be about to fail
            return None if user.failures else _WAIT
        at_most = address.failures + address.pending if address is not None else 0
        if address is not None and key_slot is None and address.failures < self.address_ceiling <= at_most:
            # the checks in flight may take the address over its ceiling: wait for them, as
            # for a username's budget, so that concurrent logins of many usernames make at
            # most the ceiling's worth of full checks (a legacy password's hash; past the
            # ceiling a check computes none: Attempt.over_ceiling). Not a key's login
            # (`key_slot`): it computes no hash, and must not wait the half second of a
            # wrong password typed behind the same shared address (LEGACY_FAILURE_FLOOR)
            return _WAIT
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

    def _with_shared(self, slot: Slot, size: int, horizon: float, now: float,
                     shared: dict[Slot, SlotCount] | None) -> _Window | None:
        """The counter for `slot` (None: nothing counted), holding the cluster's count."""
        window = self._get(slot, horizon)
        count, age = shared.get(slot, (0, 0.0)) if shared is not None else (0, 0.0)
        if window is None and count:
            window = self._make(slot, size)
        if window is not None:
            window.shared, window.shared_newest = count, now - age
        return window

    def retry_after(self, client_ip: str, username: str) -> int:
        """Whole seconds after which `username` from `client_ip`, refused now, is surely
        checked again: when its newest counted failure leaves the window (an empty counter
        is never refused, whatever the address's). For a Retry-After header."""
        window = self._windows.get(("user", client_network(client_ip), canonical_address(username)[:320]))
        newest = None if window is None else window.newest()
        if newest is None:
            return 1
        return max(1, math.ceil(newest + self.window - time.monotonic()))

    def record_failure(self, client_ip: str, username: str) -> None:
        """A failure no keystore check was made for (a malformed AUTH exchange)."""
        attempt = self._decide(self._slots(client_ip, username, None), None)
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
