"""Provider health: which smarthosts are worth a connection right now.

A smarthost that fails `down_after` sessions in a row (see below) is marked down for
`backoff`; routes skip it meanwhile (relay/delivery/routing.py, relay/queue/attempt.py),
so a failover group goes straight to its next member instead of paying a connect timeout
per message, and a route whose upstreams are all down defers its mail without connecting
at all. When the backoff ends, one delivery is let through as the probe (every other
delivery keeps skipping the provider until it reports): a working session marks the
provider up again, a failure doubles the backoff, up to `max_backoff`.

What counts as a failure is decided where replies are classified: an Outcome marked
`session_failed` (relay/delivery/errors.py:session_trouble): the connection refused or
timed out, TLS failed, the greeting, EHLO, STARTTLS or AUTH refused, a 421 or a lost
connection at MAIL FROM. Anything else (recipients refused, a MAIL FROM refusal aimed at
one sender, a message refused at DATA) says the session worked, and counts as a success.

Only smarthosts are tracked: an MX upstream talks to each recipient domain's own
servers, and one domain's dead MX says nothing about the next domain.

The same object keeps rolling counts of delivery outcomes per upstream (OutcomeCounts),
for `relay status` (through the state file, relay/statefile.py) and the metrics.
Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

from relay import maillog
from relay.config import Config, HealthConfig, UpstreamConfig
from relay.delivery.courier import Outcome, Status

__all__ = ["OutcomeCounts", "ProviderHealth", "ProviderState", "Ticket", "format_seconds", "tracked_names"]

log = logging.getLogger("relay.delivery")


def tracked_names(config: Config) -> list[str]:
    """The upstreams provider health follows: every smarthost, no MX upstream."""
    return [u.name for u in config.upstream if u.kind == "smarthost"]


def format_seconds(seconds: float) -> str:
    """"0.3s", "25s", "10m", "5h", "364d": one unit, for log lines, replies and `relay status`."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds:.1f}s"
    for unit, size, below in (("s", 1, 120), ("m", 60, 7200), ("h", 3600, 172800)):
        if seconds < below:
            return f"{round(seconds / size)}{unit}"
    return f"{seconds // 86400:.0f}d"


@dataclass(frozen=True, slots=True)
class ProviderState:
    """One smarthost's health at one moment (ProviderHealth.snapshot()): what the state
    file, `relay status` and the metrics show. Times are Unix times (seconds)."""

    name: str
    up: bool
    failures: int  # session-level failures in a row (0 after any working session)
    down_until: float | None  # down: when its backoff ends and a probe may go; None while up
    since: float  # the last transition (or when the relay started following it)
    last_error: str | None  # the reply of the last session-level failure
    backoff: float  # down: the backoff being served; up: the one a first failure would get
    probing: bool  # a probe delivery is under way
    downs: int  # times it was marked down since the relay started


class _Provider:
    __slots__ = ("backoff", "down_until", "downs", "failures", "last_error", "probing", "since", "up")

    def __init__(self, backoff: float, now: float) -> None:
        self.up = True
        self.failures = 0
        self.down_until = 0.0  # monotonic; meaningful while down
        self.backoff = backoff
        self.since = now  # wall clock
        self.last_error: str | None = None
        self.probing = False
        self.downs = 0


class OutcomeCounts:
    """Recipients per (upstream, outcome) per minute for the last hour, in minute buckets
    (one Counter per minute that saw a delivery), plus totals since the relay started.

    `totals(300)` is "the last 5 minutes": the current minute and the 4 before it, so it
    covers between 4 and 5 minutes of the past; close enough for an operator's view."""

    MINUTES = 60

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minutes: deque[tuple[int, Counter[tuple[str, str]]]] = deque()
        self.since_start: Counter[tuple[str, str]] = Counter()

    def add(self, upstream: str, status: Status | str, count: int = 1) -> None:
        minute = int(self._clock() // 60)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, Counter()))
            self._prune(minute)
        key = (upstream, str(status))
        self._minutes[-1][1][key] += count
        self.since_start[key] += count

    def _prune(self, minute: int) -> None:
        while self._minutes and self._minutes[0][0] <= minute - self.MINUTES:
            self._minutes.popleft()

    def totals(self, seconds: float) -> dict[str, dict[str, int]]:
        """{upstream: {"sent": n, "deferred": n, "failed": n}} over the last `seconds`
        (whole minutes, at most an hour); upstreams with nothing in the window are left out."""
        now_minute = int(self._clock() // 60)
        first = now_minute - max(1, min(self.MINUTES, math.ceil(seconds / 60))) + 1
        result: dict[str, dict[str, int]] = {}
        for minute, counts in self._minutes:
            if minute < first:
                continue
            for (upstream, status), count in counts.items():
                row = result.setdefault(upstream, {s.value: 0 for s in Status})
                row[status] = row.get(status, 0) + count
        return result


class Ticket:
    """Leave to deliver through one upstream once (ProviderHealth.admit). `report()` what
    the courier returned; a ticket left without a report (an error, a cancellation at
    shutdown) changes nothing but gives a probe's turn back. Use it as a context manager
    so that happens whatever way the delivery ends."""

    __slots__ = ("_health", "_reported", "name", "probe")

    def __init__(self, health: ProviderHealth, name: str, probe: bool) -> None:
        self._health = health
        self.name = name
        self.probe = probe
        self._reported = False

    def report(self, outcomes: Mapping[str, Outcome]) -> None:
        if self._reported:
            return
        self._reported = True
        self._health._report(self, outcomes)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._reported:
            self._reported = True
            self._health._abandon(self)


class ProviderHealth:
    """Created once per relay (relay/app.py) and handed to every Router it builds, so a
    reload keeps what it knows about upstreams that are still configured (`follow`)."""

    def __init__(self, config: HealthConfig, names: Iterable[str] = (), *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.counts = OutcomeCounts(wall_clock)
        self._clock = clock
        self._wall = wall_clock
        self._providers: dict[str, _Provider] = {}
        self._settings: dict[str, UpstreamConfig] = {}  # of each provider, once `follow` has a config
        self._listeners: list[Callable[[], None]] = []
        self.retain(names)

    # ------------------------------------------------------------ configuration

    def follow(self, config: Config) -> None:
        """Adopt a (reloaded) config: its thresholds and its smarthosts. One whose settings
        changed (host, port, TLS, credentials, CA file: often the reload that fixes it)
        is another provider: it starts up, rather than serve out the old one's backoff."""
        self.configure(config.provider_health)
        settings = {u.name: u for u in config.upstream if u.kind == "smarthost"}
        for name, upstream in settings.items():
            if self._settings.get(name, upstream) != upstream:
                self._providers.pop(name, None)
        self._settings = settings
        self.retain(tracked_names(config))

    def configure(self, config: HealthConfig) -> None:
        """New thresholds; a provider already down serves out the backoff it has."""
        self.config = config
        for provider in self._providers.values():
            if provider.up:
                provider.backoff = config.backoff

    def retain(self, names: Iterable[str]) -> None:
        """Follow exactly `names`: new ones start up, the others are forgotten, those still
        named keep their state."""
        wanted = list(dict.fromkeys(names))
        now = self._wall()
        self._providers = {
            name: self._providers.get(name) or _Provider(self.config.backoff, now) for name in wanted
        }

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every transition (down, up, a failed probe)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------ delivery

    def admit(self, name: str) -> Ticket | None:
        """A ticket to deliver through `name` now, or None while it is down: its backoff
        runs, or another delivery is its probe. Untracked upstreams are always admitted."""
        provider = self._providers.get(name)
        if provider is None or provider.up:
            return Ticket(self, name, probe=False)
        if provider.probing or self._clock() < provider.down_until:
            return None
        provider.probing = True
        return Ticket(self, name, probe=True)

    def next_probe_in(self, names: Iterable[str]) -> float | None:
        """Seconds until the first of `names` (all down) may be probed; 0 if one is being
        probed or due; None if one of them is up or untracked."""
        waits = []
        now = self._clock()
        for name in names:
            provider = self._providers.get(name)
            if provider is None or provider.up:
                return None
            waits.append(0.0 if provider.probing else max(provider.down_until - now, 0.0))
        return min(waits) if waits else None

    def _report(self, ticket: Ticket, outcomes: Mapping[str, Outcome]) -> None:
        for outcome in outcomes.values():
            self.counts.add(ticket.name, outcome.status)
        provider = self._providers.get(ticket.name)
        if provider is None or not outcomes:  # untracked (or gone at a reload)
            return
        if ticket.probe:
            provider.probing = False
        failed = [o for o in outcomes.values() if o.session_failed]
        if len(failed) == len(outcomes):
            self._failed(ticket, provider, failed[0].reply)
        else:
            self._worked(ticket.name, provider)

    def _abandon(self, ticket: Ticket) -> None:
        provider = self._providers.get(ticket.name)
        if provider is not None and ticket.probe:
            provider.probing = False

    def _failed(self, ticket: Ticket, provider: _Provider, reply: str) -> None:
        provider.failures += 1
        provider.last_error = reply
        cfg = self.config
        if provider.up:
            if provider.failures < cfg.down_after:
                return
            provider.up = False
            provider.downs += 1
            provider.since = self._wall()
            provider.backoff = cfg.backoff
            provider.down_until = self._clock() + provider.backoff
            maillog.provider_down(ticket.name, provider.failures, provider.backoff, reply)
        elif ticket.probe:
            provider.backoff = min(provider.backoff * 2, cfg.max_backoff)
            provider.down_until = self._clock() + provider.backoff
            maillog.provider_probe_failed(ticket.name, provider.failures, provider.backoff, reply)
        else:
            return  # a delivery admitted before it went down: its backoff stands
        self._changed()

    def _worked(self, name: str, provider: _Provider) -> None:
        was_down = not provider.up
        failures = provider.failures
        provider.failures = 0
        provider.backoff = self.config.backoff
        if not was_down:
            return
        now = self._wall()
        maillog.provider_up(name, now - provider.since, failures)
        provider.up = True
        provider.probing = False
        provider.since = now
        self._changed()

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not break delivery
                log.exception("provider health listener failed")

    # ------------------------------------------------------------ views

    def snapshot(self) -> list[ProviderState]:
        """Every tracked smarthost, in config order."""
        now, wall = self._clock(), self._wall()
        return [
            ProviderState(
                name=name, up=p.up, failures=p.failures,
                down_until=None if p.up else wall + (p.down_until - now),
                since=p.since, last_error=p.last_error, backoff=p.backoff, probing=p.probing,
                downs=p.downs,
            )
            for name, p in list(self._providers.items())
        ]
