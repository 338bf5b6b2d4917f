"""The delivery engine: workers that take spooled messages through their route's plan of
upstreams and record what happened, plus a scheduler that brings deferred messages back
when they are due.

State lives in the spool, not here: a fresh message is handed over in memory (it was just
written), a retry is re-read from the spool, and a restart rebuilds the schedule from it.
When another process changes the spool (`relay queue retry/hold/delete`), the scheduler
notices through sqlite's data_version and rebuilds its schedule. A message id is never
queued twice at once (`_active`), so nothing is delivered twice.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time

from relay import maillog
from relay.delivery.courier import Outcome, Status
from relay.delivery.routing import Router
from relay.dsn import build_dsn
from relay.spool import QueueItem, Spool, SpoolError, new_queue_id

__all__ = ["DeliveryEngine"]

log = logging.getLogger("relay.delivery")

_NO_RESULT = Outcome(Status.DEFERRED, "451 4.3.0 no result from the upstream")
_SPOOL_POLL = 0.5  # seconds between checks for changes made by `relay queue`


class DeliveryEngine:
    def __init__(
        self, spool: Spool, router: Router, *, hostname: str,
        retry_schedule: tuple[float, ...], max_lifetime: float, workers: int,
    ) -> None:
        self._spool = spool
        self._router = router
        self._hostname = hostname
        self._schedule = retry_schedule or (300.0,)
        self._max_lifetime = max_lifetime
        self._workers = workers
        self._ready: asyncio.Queue[QueueItem | str] = asyncio.Queue()
        self._timers: list[tuple[float, str]] = []
        self._active: set[str] = set()  # ids queued or being delivered
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._spool_version: int | None = None

    async def start(self) -> None:
        await self._reload()
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self._workers)]
        self._tasks.append(asyncio.create_task(self._scheduler()))

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel the workers; what they were doing is in the spool and resumes at the next
        start. Bounded, because a cancellation can be swallowed inside a library's timeout
        handling (asyncio.wait_for in Python 3.11)."""
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=timeout)
        if stuck:
            log.warning("%d delivery task(s) did not stop within %.0f s", len(stuck), timeout)

    def submit(self, item: QueueItem) -> None:
        """A message the spool has just stored durably: deliver it now."""
        self._active.add(item.id)
        self._ready.put_nowait(item)

    # ------------------------------------------------------------ scheduling

    async def _reload(self) -> None:
        _, self._spool_version = await self._spool.changed_elsewhere(None)
        self._timers = [entry for entry in await self._spool.due() if entry[1] not in self._active]
        heapq.heapify(self._timers)
        self._wake.set()

    async def _scheduler(self) -> None:
        checked = time.monotonic()
        while True:
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                _, message_id = heapq.heappop(self._timers)
                if message_id not in self._active:
                    self._active.add(message_id)
                    self._ready.put_nowait(message_id)
            delay = _SPOOL_POLL if not self._timers else min(_SPOOL_POLL, self._timers[0][0] - now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(delay, 0.0))
            except TimeoutError:
                pass
            if time.monotonic() - checked >= _SPOOL_POLL:
                checked = time.monotonic()
                await self._follow_spool()

    async def _follow_spool(self) -> None:
        """Pick up what `relay queue` changed; the scheduler must outlive a bad disk moment."""
        try:
            changed, _ = await self._spool.changed_elsewhere(self._spool_version)
            if changed:
                await self._reload()
        except Exception:
            log.exception("cannot read the spool's schedule; trying again shortly")

    def _later(self, when: float, message_id: str) -> None:
        heapq.heappush(self._timers, (when, message_id))
        self._wake.set()

    # -------------------------------------------------------------- delivery

    async def _worker(self) -> None:
        while True:
            entry = await self._ready.get()
            message_id = entry.id if isinstance(entry, QueueItem) else entry
            try:
                item = entry if isinstance(entry, QueueItem) else await self._spool.load(entry)
                # None: deleted or put on hold meanwhile; a later next_attempt: a stale timer
                if item is not None and (item is entry or item.next_attempt <= time.time() + 0.05):
                    await self._attempt(item)
            except SpoolError:
                log.exception("cannot record a delivery attempt; retrying from the spool")
                self._later(time.time() + self._schedule[0], message_id)
            except Exception:
                log.exception("unexpected error delivering %s; retrying later", message_id)
                self._later(time.time() + self._schedule[0], message_id)
            finally:
                self._active.discard(message_id)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise asyncio.CancelledError  # a cancel swallowed during the attempt: stop now

    async def _attempt(self, item: QueueItem) -> None:
        started = time.time()
        outcomes: dict[str, Outcome] = {}
        pending = list(item.recipients)
        for courier in self._router.plan(item.route) if pending else []:
            results = await courier.deliver(item.mail_from, pending, item.body)
            for rcpt in pending:
                outcome = results.get(rcpt, _NO_RESULT)
                outcomes[rcpt] = outcome
                maillog.attempt(item, rcpt, courier.name, outcome, delay=started - item.created)
            pending = [r for r in pending if outcomes[r].status is Status.DEFERRED]
            if not pending:
                break
        if pending and started - item.created >= self._max_lifetime:
            for rcpt in pending:
                last = outcomes[rcpt].reply
                outcomes[rcpt] = Outcome(Status.FAILED, f"expired in queue; last reply: {last}")
                maillog.attempt(item, rcpt, "-", outcomes[rcpt], delay=started - item.created)
            pending = []
        next_attempt = None
        if pending:
            next_attempt = time.time() + self._schedule[min(item.attempts, len(self._schedule) - 1)]
        failures = [(r, o.reply) for r, o in outcomes.items() if o.status is Status.FAILED]
        bounce = self._bounce(item, failures) if failures else None
        await self._spool.record_attempt(
            item,
            [(rcpt, _SPOOL_STATUS[o.status], o.reply) for rcpt, o in outcomes.items()],
            next_attempt=next_attempt,
            last_error=outcomes[pending[0]].reply if pending else None,
            bounce=bounce,
        )
        if bounce is not None:
            self.submit(bounce)
        if next_attempt is not None:
            self._later(next_attempt, item.id)

    def _bounce(self, item: QueueItem, failures: list[tuple[str, str]]) -> QueueItem | None:
        if not item.mail_from:
            log.warning("not bouncing a bounce: %s failed for %d recipient(s)", item.id, len(failures))
            return None
        now = time.time()
        return QueueItem(
            id=new_queue_id(), created=now, mail_from="", recipients=[item.mail_from],
            key_id=item.key_id, mailbox=item.mailbox, route=item.route,
            body=build_dsn(original=item.body, mail_from=item.mail_from, queue_id=item.id,
                           arrival=item.created, failures=failures, hostname=self._hostname, now=now),
        )


_SPOOL_STATUS = {Status.SENT: "sent", Status.FAILED: "failed", Status.DEFERRED: "pending"}
