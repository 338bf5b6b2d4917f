"""The delivery engine: workers that take spooled messages to their courier and record
what happened, plus a scheduler that brings deferred messages back when they are due.

State lives in the spool, not here: a fresh message is handed over in memory (it was just
written), a retry is re-read from the spool, and a restart rebuilds the schedule from it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable

from relay import maillog
from relay.delivery.courier import Courier, Outcome, Status
from relay.spool import QueueItem, Spool, SpoolError

__all__ = ["DeliveryEngine"]

log = logging.getLogger("relay.delivery")


class DeliveryEngine:
    def __init__(
        self, spool: Spool, route: Callable[[QueueItem], Courier], *,
        retry_schedule: tuple[float, ...], max_lifetime: float, workers: int,
    ) -> None:
        self._spool = spool
        self._route = route
        self._schedule = retry_schedule or (300.0,)
        self._max_lifetime = max_lifetime
        self._workers = workers
        self._ready: asyncio.Queue[QueueItem | str] = asyncio.Queue()
        self._timers: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0

    async def start(self) -> None:
        for due, message_id in await self._spool.due():
            heapq.heappush(self._timers, (due, message_id))
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._scheduler()))
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def submit(self, item: QueueItem) -> None:
        """A message the spool has just stored durably: deliver it now."""
        self._ready.put_nowait(item)

    @property
    def idle(self) -> bool:
        return self._ready.empty() and self._busy == 0

    async def _scheduler(self) -> None:
        while True:
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(self._timers)[1])
            delay = self._timers[0][0] - now if self._timers else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _later(self, when: float, message_id: str) -> None:
        heapq.heappush(self._timers, (when, message_id))
        self._wake.set()

    async def _worker(self) -> None:
        while True:
            entry = await self._ready.get()
            self._busy += 1
            try:
                item = entry if isinstance(entry, QueueItem) else await self._spool.load(entry)
                if item is not None:
                    await self._attempt(item)
            except SpoolError:
                log.exception("cannot record a delivery attempt; will retry from the spool")
                if isinstance(entry, QueueItem):
                    self._later(time.time() + self._schedule[0], entry.id)
            except Exception:
                log.exception("unexpected error in delivery worker")
            finally:
                self._busy -= 1

    async def _attempt(self, item: QueueItem) -> None:
        if not item.recipients:
            await self._spool.record_attempt(item, [], next_attempt=None, last_error=None)
            return
        courier = self._route(item)
        started = time.time()
        outcomes = await courier.deliver(item.mail_from, item.recipients, item.body)
        for rcpt in item.recipients:
            outcome = outcomes.get(rcpt, Outcome(Status.DEFERRED, "451 4.3.0 no result"))
            maillog.attempt(item, rcpt, courier.name, outcome, delay=started - item.created)
        pending = [r for r in item.recipients if outcomes[r].status is Status.DEFERRED]
        expired = started - item.created >= self._max_lifetime
        if pending and expired:
            for rcpt in pending:
                outcomes[rcpt] = Outcome(Status.FAILED, f"expired in queue: {outcomes[rcpt].reply}")
                maillog.attempt(item, rcpt, courier.name, outcomes[rcpt], delay=started - item.created)
            pending = []
        next_attempt = None
        if pending:
            next_attempt = time.time() + self._schedule[min(item.attempts, len(self._schedule) - 1)]
        last_error = next((outcomes[r].reply for r in pending), None)
        await self._spool.record_attempt(
            item,
            [(rcpt, _spool_status(outcomes[rcpt].status), outcomes[rcpt].reply) for rcpt in item.recipients],
            next_attempt=next_attempt,
            last_error=last_error,
        )
        if next_attempt is not None:
            self._later(next_attempt, item.id)


def _spool_status(status: Status) -> str:
    return {Status.SENT: "sent", Status.FAILED: "failed", Status.DEFERRED: "pending"}[status]
