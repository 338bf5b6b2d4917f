"""The queue: it owns accepted messages from the 250 until every recipient is decided.

    put()      store a message durably and schedule it, in one step (the session's 250)
    start()    release what a dead relay left claimed; schedule everything waiting
    stop()     let running deliveries record what they did; start nothing new
    store      the storage (relay/queue/sqlite.py, or relay/queue/postgres.py shared by
               several relays), whose admin operations `relay queue` uses

On a shared queue a claim is a lease: the queue renews its leases every lease/3 while it
runs, so that only a node that died leaves its deliveries to the others.

A delivery claims its message in the spool, reads it, runs one attempt through the
route's couriers (relay/queue/attempt.py) and writes everything the attempt learnt in
one transaction. If that write fails (a full disk), the outcome is kept and the write
retried until it lands; the delivery is never repeated for it. The queue therefore
delivers each recipient at least once, and more than once only when the upstream's reply
to the end of the data never reaches the spool: the relay died or stopped after the
upstream received the data, or the connection broke while waiting for that reply (RFC
5321 section 6.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import TYPE_CHECKING

from relay.delivery.courier import Outcome
from relay.delivery.routing import Router
from relay.metrics import Metrics
from relay.queue.attempt import attempt, partial_record
from relay.queue.model import AttemptRecord, Delivery, Fate, FileBody, NotDue, QueueItem, new_queue_id
from relay.queue.postgres import PostgresQueueStore
from relay.queue.schedule import Scheduler, retry_delay
from relay.queue.sqlite import SqliteQueueStore
from relay.queue.store import QueueStore, SpoolBusy, SpoolError, SpoolFull

if TYPE_CHECKING:
    from relay.config import ClusterConfig, QueueConfig

__all__ = ["FileBody", "Queue", "QueueItem", "SpoolBusy", "SpoolError", "SpoolFull", "new_queue_id"]

log = logging.getLogger("relay.queue")

_FOLLOW_INTERVAL = 0.5  # seconds between looks for changes made by `relay queue`
_RECORD_RETRY_MAX = 10.0  # seconds between tries to store an outcome the disk refused


class Queue:
    def __init__(
        self, store: QueueStore, router: Router, *, hostname: str,
        retry_schedule: tuple[float, ...], max_lifetime: float, metrics: Metrics | None = None,
        node: str | None = None, lease: float = 60.0,
    ) -> None:
        self.store = store
        self._metrics = metrics  # delivery attempts and latency (relay/queue/attempt.py)
        self._router = router
        self._hostname = hostname
        self._retry = retry_schedule or (300.0,)
        self._max_lifetime = max_lifetime
        self._owner = f"{node or socket.gethostname()}:{os.getpid()}"
        self._lease = float(lease)
        self._scheduler = Scheduler(self._deliver, router.concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._version: int | None = None
        self._stale = False  # a schedule read failed: read it again at the next look
        self._stopping = asyncio.Event()  # set by stop(): the loops end at their next turn
        self._unrecorded = 0  # outcomes the spool has refused to store so far (a full disk)

    @classmethod
    async def open(cls, config: QueueConfig, cluster: ClusterConfig, router: Router, **options) -> Queue:
        """The relay's queue: PostgreSQL with [queue] url, else the sqlite spool at [queue]
        path (SpoolBusy if another relay has it, or one with the same node name runs)."""
        store: QueueStore
        if config.url:
            store = await PostgresQueueStore.open(config.url, relay=True, node=cluster.node,
                                                  lease=cluster.lease)
        else:
            store = await SqliteQueueStore.open(config.path, relay=True)
        return cls(store, router, node=cluster.node, lease=cluster.lease, **options)

    async def start(self) -> None:
        await self.store.recover()
        await self._reschedule()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._scheduler.run()), loop.create_task(self._follow()),
                       loop.create_task(self._renew())]

    async def put(self, item: QueueItem) -> None:
        """Make `item` durable (fsync'd) and schedule its delivery; the caller answers 250
        only after this returns. Claimed in the same write, so nothing else can schedule it.
        A FileBody is closed once copied; its delivery reads the body back from the spool
        rather than keep a big message in memory until then."""
        try:
            await self.store.put(item, claimed_by=self._owner)
        except SpoolError:
            # a shared queue may have stored it all the same (the database's answer lost
            # with its connection, and no way to ask meanwhile): claimed by this node, it
            # would wait for the node's next restart; the next look at the schedule finds
            # it (the client, told 451, may send it again: RFC 5321 section 6.1)
            self._stale = True
            raise
        finally:
            if isinstance(item.body, FileBody):
                item.body.close()
        preloaded = item if isinstance(item.body, bytes) else None
        self._scheduler.now(item.id, self._router.resolve(item.route), fresh=True, preloaded=preloaded)

    def reconfigure(self, router: Router, *, hostname: str, retry_schedule: tuple[float, ...],
                    max_lifetime: float) -> None:
        """A reload: new routes, retry schedule, lifetime and bounce hostname for the next
        attempt of every message; the times already scheduled stand, deliveries under way
        finish on the couriers they started with."""
        self._router = router
        self._hostname = hostname
        self._retry = retry_schedule or (300.0,)
        self._max_lifetime = max_lifetime
        self._scheduler.relimit(lambda lane: router.concurrency(lane) if router.knows(lane) else None)

    async def stop(self, timeout: float = 5.0) -> None:
        """The loops end at their next turn even if an await inside them swallowed the
        cancellation (asyncio.wait_for can, on Python 3.11, when the awaited call finishes
        as the cancellation arrives); a loop still running after that is left, not awaited
        for ever."""
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=timeout) if self._tasks else (set(), set())
        if stuck:
            log.error("%d queue loop(s) did not stop at shutdown", len(stuck))
        await self._scheduler.stop(timeout)

    async def close(self) -> None:
        await self.store.close()

    # ------------------------------------------------------------ schedule

    async def _reschedule(self) -> None:
        """Merge the spool's schedule into the timers; the version is kept only once that
        worked, so a failed read is tried again rather than missed."""
        _, version = await self.store.changed_elsewhere(None)
        entries = await self.store.schedule(self._owner)
        self._scheduler.merge([(when, mid, self._router.resolve(route)) for when, mid, route in entries])
        self._version = version

    async def _follow(self) -> None:
        """Pick up what `relay queue` changed; this loop must outlive a bad disk moment."""
        while not await self._stopped_within(_FOLLOW_INTERVAL):
            try:
                changed, _ = await self.store.changed_elsewhere(self._version)
                if changed or self._stale:
                    self._stale = True
                    await self._reschedule()
                    self._stale = False
            except Exception:
                log.exception("cannot read the queue's schedule; trying again shortly")

    async def _renew(self) -> None:
        """Keep our claims' leases (a shared queue): every lease/3, so two failed renewals
        in a row still leave a third before another node may take a delivery over."""
        while not await self._stopped_within(self._lease / 3):
            try:
                await self.store.renew(self._owner)
            except Exception:
                log.exception("cannot renew this node's claims in the queue; trying again shortly")

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait `seconds`; True as soon as stop() began (then the loop ends)."""
        if self._stopping.is_set():
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ delivery

    async def _deliver(
        self, message_id: str, fresh: bool, lane: str, preloaded: object,
    ) -> Awaitable[None] | None:
        """One delivery: claim (or, fresh, just read) and attempt; returns the recording
        and rescheduling, which the scheduler runs once the lane has its place back."""
        if self._unrecorded:  # the spool cannot store outcomes: deliver nothing more meanwhile
            self._scheduler.later(time.time() + min(self._retry[0], 5.0), message_id, lane)
            return None
        try:
            if isinstance(preloaded, QueueItem):  # just stored and claimed: no need to read it
                delivery: Delivery | NotDue | None = _fresh(preloaded)
            elif fresh:
                delivery = await self.store.load(message_id)
            else:
                delivery = await self.store.claim(message_id, self._owner, time.time())
        except Exception as exc:  # noqa: BLE001 - a claim of ours is kept; try again shortly
            if isinstance(exc, SpoolError):
                log.warning("cannot read %s from the spool (%s); trying again shortly", message_id, exc)
            else:
                log.exception("cannot read %s from the spool; trying again shortly", message_id)
            self._scheduler.later(time.time() + self._retry[0], message_id, lane)
            return None
        if delivery is None:
            return None  # deleted, on hold or claimed meanwhile
        if isinstance(delivery, NotDue):  # a stale timer: the spool knows the real time
            self._scheduler.later(delivery.when, message_id, lane)
            return None
        outcomes: dict[str, Outcome] = {}
        try:
            if delivery.stop:  # held or deleted by an admin after it was claimed
                record = AttemptRecord(message_id=message_id, attempted=False)
            else:
                record = await attempt(
                    delivery, self._router.plan(delivery.route), note=self.store.note, outcomes=outcomes,
                    hostname=self._hostname, retry_schedule=self._retry, max_lifetime=self._max_lifetime,
                    metrics=self._metrics,
                )
        except asyncio.CancelledError:  # shutdown: keep what was learnt, then stop
            if outcomes:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.record(partial_record(delivery, outcomes)))
            raise
        except Exception as exc:  # noqa: BLE001 - attempt() keeps its own; this is a bug around it
            log.exception("unexpected error delivering %s", message_id)
            record = AttemptRecord(message_id=message_id, error=repr(exc),
                                   next_attempt=time.time() + retry_delay(self._retry, delivery.attempts + 1))
        return self._finish(delivery, record)

    async def _finish(self, delivery: Delivery, record: AttemptRecord) -> None:
        fate = await self._record(record)
        log.debug("recorded id=%s fate=%s", delivery.id, fate.value)
        self._after(delivery, record, fate)

    async def _record(self, record: AttemptRecord) -> Fate:
        """Store the record, however long the disk needs: the delivery it describes is
        never repeated because its outcome could not be written. Meanwhile no new delivery
        starts (see _deliver), so outcomes do not pile up in memory."""
        delay, counted = 0.25, False
        try:
            while True:
                try:
                    return await self.store.record(record)
                except SpoolError as exc:
                    log.error("cannot record the attempt on %s (%s); the outcome is kept and written "
                              "again in %.1f s", record.message_id, exc, delay)
                except Exception:  # a bug in what we write: write less rather than repeat a delivery
                    log.exception("cannot record the attempt on %s; retrying without its texts",
                                  record.message_id)
                    record = _plain(record)
                if not counted:
                    self._unrecorded, counted = self._unrecorded + 1, True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECORD_RETRY_MAX)
        finally:
            if counted:
                self._unrecorded -= 1

    def _after(self, delivery: Delivery, record: AttemptRecord, fate: Fate) -> None:
        if record.bounce is not None:
            self._scheduler.now(record.bounce.id, self._router.resolve(record.bounce.route))
        if fate is Fate.RETRY:
            self._scheduler.later(record.next_attempt, delivery.id, self._router.resolve(delivery.route))
        elif fate is Fate.HELD and record.error is not None:
            log.error("message %s put on hold after repeated unexpected errors (last: %s); "
                      "`relay queue release %s` to try again", delivery.id, record.error, delivery.id)
        elif fate is Fate.DELETED:
            log.info("message %s deleted by an admin after its delivery attempt", delivery.id)


def _fresh(item: QueueItem) -> Delivery:
    return Delivery(id=item.id, created=item.created, mail_from=item.mail_from, key_id=item.key_id,
                    mailbox=item.mailbox, route=item.route, attempts=0, pending=list(item.recipients),
                    unnotified=[], body=item.body)


def _plain(record: AttemptRecord) -> AttemptRecord:
    """The same outcomes with ASCII-only texts and no bounce (its failures stay un-notified,
    so the bounce is built again next time)."""

    def ascii_(text: str | None) -> str | None:
        return None if text is None else text.encode("ascii", "replace").decode("ascii")

    return replace(
        record, bounce=None, notified=[], last_error=ascii_(record.last_error), error=ascii_(record.error),
        outcomes={rcpt: (status, ascii_(reply) or "") for rcpt, (status, reply) in record.outcomes.items()},
    )
