"""Metrics read when the page is scraped, not counted as events happen.

A scrape runs on the endpoint's thread (relay/metrics/endpoint.py), never on the event
loop, and must stay cheap and bounded in time whatever the relay is doing:

* the queue's depth and oldest message come from one aggregate over the spool's
  `message` table (small rows: bodies live in a table of their own), run on the spool's
  reader thread with its read connection, waited for at most SCRAPE_WAIT (a shared queue
  in PostgreSQL: the same aggregate over the whole cluster's queue, run on the event loop
  through the queue's pool, waited for as long);
* provider health is whatever `ProviderHealth.snapshot()` (relay/delivery/health.py)
  returns, called on the event loop (the state it reads belongs to the loop), waited for
  at most SCRAPE_WAIT. A wedged loop leaves the series out of that scrape (and /healthz
  says why) instead of hanging the scrape.

A part that cannot answer is left out of the page (Prometheus marks its series stale),
never reported as zero: an empty queue and an unreadable spool must not look alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from relay.queue.model import QueueDepth

__all__ = ["SCRAPE_WAIT", "DepthSource", "ProviderHealthCollector", "QueueCollector", "Snapshot", "on_loop"]

log = logging.getLogger("relay.metrics")

SCRAPE_WAIT = 1.0  # seconds a scrape waits for the spool's reader or the event loop

T = TypeVar("T")


class ProviderView(Protocol):
    """What the metrics read of relay.delivery.health.ProviderState."""

    name: str
    up: bool
    failures: int
    downs: int


Snapshot = Iterable[ProviderView]


class DepthSource(Protocol):
    def depth_now(self, timeout: float) -> QueueDepth:
        """The queue's depth from a thread that is not the event loop's; raises if it
        cannot say within `timeout` seconds."""
        ...


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float) -> T:
    """`fn()` run on `loop` (from another thread), its result within `timeout` seconds.

    TimeoutError if the loop does not get to it in time (it is then not run at all, or
    its result is dropped); RuntimeError if the loop is closed."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return  # the caller gave up waiting
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


class QueueCollector(Collector):
    """keyrelay_queue_messages, keyrelay_queue_held_messages, keyrelay_queue_oldest_message_age_seconds."""

    def __init__(self) -> None:
        self.source: DepthSource | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # collected on demand: nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self.source
        if source is None:
            return
        try:
            depth = source.depth_now(SCRAPE_WAIT)
        except Exception as exc:  # noqa: BLE001 - any failure: leave the series out of this scrape
            log.debug("queue depth not collected: %r", exc)
            return
        yield GaugeMetricFamily(
            "keyrelay_queue_messages",
            "Messages in the spool with recipients still to decide (held included); with a shared "
            "queue ([queue] url) the whole cluster's, the same on every node", value=depth.messages)
        yield GaugeMetricFamily(
            "keyrelay_queue_held_messages",
            "Messages on hold (relay queue hold, or poison); the whole cluster's with a shared queue",
            value=depth.held)
        yield GaugeMetricFamily(
            "keyrelay_queue_oldest_message_age_seconds",
            "Seconds since the oldest message in the spool was accepted (0 when the spool is empty)",
            value=0.0 if depth.oldest_created is None else max(time.time() - depth.oldest_created, 0.0))


class ProviderHealthCollector(Collector):
    """keyrelay_provider_up, keyrelay_provider_consecutive_failures and
    keyrelay_provider_downs_total, by provider, from ProviderHealth.snapshot()."""

    def __init__(self) -> None:
        self._snapshot: Callable[[], Snapshot] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, snapshot: Callable[[], Snapshot] | None) -> None:
        """Called on the event loop: the snapshot is then taken there at each scrape."""
        self._snapshot = snapshot
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # no loop (a test, a tool): called on the scrape's thread

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot, loop = self._snapshot, self._loop
        if snapshot is None:
            return
        try:  # a list, made on the loop: the scrape's thread never walks the live state
            if loop is None:
                states = list(snapshot())
            else:
                states = on_loop(loop, lambda: list(snapshot()), SCRAPE_WAIT)
        except Exception as exc:  # noqa: BLE001 - leave the series out of this scrape
            log.debug("provider health not collected: %r", exc)
            return
        up = GaugeMetricFamily(
            "keyrelay_provider_up", "1 if the provider is up, 0 while provider health has it down",
            labels=["provider"])
        failures = GaugeMetricFamily(
            "keyrelay_provider_consecutive_failures",
            "Session-level failures in a row (0 after a working session)", labels=["provider"])
        downs = CounterMetricFamily(
            "keyrelay_provider_downs", "Times the provider was marked down since the relay started",
            labels=["provider"])
        for state in states:
            up.add_metric([state.name], 1.0 if state.up else 0.0)
            failures.add_metric([state.name], float(state.failures))
            downs.add_metric([state.name], float(state.downs))
        yield up
        yield failures
        yield downs
