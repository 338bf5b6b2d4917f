"""When and how many: the retry schedule's timers, and one lane per route.

Postfix's qmgr keeps a concurrency window per destination so one slow destination never
starves the rest; here every route (an upstream or a group) is a lane with its own limit
(its upstreams' max_connections). A message due for delivery waits in its route's lane as
an id, never as a body, so a long queue costs a few bytes per message; a task is started
per delivery while the lane has room, and none exist while nothing is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

__all__ = ["Scheduler", "retry_delay"]

log = logging.getLogger("relay.queue")

# (message id, claimed at put(), lane, the message itself if it is at hand) -> what is left
# to do once the upstream is done with it (storing the outcome), run outside the lane
Deliver = Callable[[str, bool, str, object], Awaitable[Awaitable[None] | None]]


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt (1-based); the last delay repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


class _Lane:
    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = max(limit, 1)
        self.waiting: deque[tuple[str, bool]] = deque()
        self.running: set[asyncio.Task[None]] = set()  # deliveries holding a place in the lane


class Scheduler:
    """Timers for deferred messages and lanes for due ones. `deliver(id, fresh, lane, preloaded)`
    runs one delivery; the scheduler guarantees one id is never being delivered twice at once."""

    def __init__(self, deliver: Deliver, limit: Callable[[str], int]) -> None:
        self._deliver = deliver
        self._limit = limit
        self._lanes: dict[str, _Lane] = {}
        self._timers: list[tuple[float, int, str, str]] = []  # (when, seq, id, lane)
        self._when: dict[str, float] = {}  # id -> its current timer; older heap entries are stale
        self._seq = itertools.count()
        self._busy: set[str] = set()  # ids waiting in a lane or being delivered
        self._tasks: set[asyncio.Task[None]] = set()  # every delivery task, recording ones too
        self._wake = asyncio.Event()
        self._stopping = False

    # -------------------------------------------------------------- input

    def now(self, message_id: str, lane: str, *, fresh: bool = False, preloaded: object = None) -> None:
        """Deliver as soon as the lane has room (fresh: already claimed by put()). A message
        at hand (`preloaded`) is used only if its delivery starts at once; a waiting one
        keeps just its id, and its body is read from the spool when its turn comes."""
        if self._stopping or message_id in self._busy:
            return
        self._busy.add(message_id)
        lane_ = self._lane(lane)
        if preloaded is not None and not lane_.waiting and len(lane_.running) < lane_.limit:
            self._start(lane_, message_id, fresh, preloaded)
            return
        lane_.waiting.append((message_id, fresh))
        self._fill(lane_)

    def later(self, when: float, message_id: str, lane: str) -> None:
        if self._when.get(message_id) == when:
            return
        self._when[message_id] = when
        heapq.heappush(self._timers, (when, next(self._seq), message_id, lane))
        self._wake.set()

    def merge(self, entries: list[tuple[float, str, str]]) -> None:
        """Times read from the spool ((when, id, lane) of every waiting message), merged
        into the timers rather than replacing them: a timer set while the read was under
        way must survive it. A time that is already stale costs one refused claim (the
        spool answers NotDue with the right time)."""
        for when, message_id, lane in entries:
            if message_id not in self._busy:
                self.later(when, message_id, lane)

    def relimit(self, limit: Callable[[str], int | None]) -> None:
        """New lane limits (a reload); None keeps a lane's limit (a route no longer
        configured: its messages go to the default route, and its lane drains)."""
        self._limit = lambda name: limit(name) or 1
        for lane in self._lanes.values():
            new = limit(lane.name)
            if new is not None:
                lane.limit = max(new, 1)
                self._fill(lane)

    # -------------------------------------------------------------- loops

    async def run(self) -> None:
        """Move due timers into their lanes; returns only when cancelled."""
        while True:
            now = time.time()
            while self._timers and self._timers[0][0] <= now:
                when, _, message_id, lane = heapq.heappop(self._timers)
                if self._when.get(message_id) == when:  # else superseded by a newer timer
                    del self._when[message_id]
                    self.now(message_id, lane)
            delay = min(self._timers[0][0] - now, 1.0) if self._timers else 1.0
            self._wake.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
            # that lands as the event is set, and the queue's stop() would wait forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.0)):
                    await self._wake.wait()

    async def stop(self, timeout: float) -> None:
        """Start nothing new; give running deliveries `timeout` to finish (and record what
        they did), then cancel the rest: the spool has them, the next start resumes."""
        self._stopping = True
        for lane in self._lanes.values():
            lane.waiting.clear()
        running = list(self._tasks)
        if not running:
            return
        _, stuck = await asyncio.wait(running, timeout=timeout)
        for task in stuck:
            task.cancel()
        if stuck:
            _, still = await asyncio.wait(stuck, timeout=2.0)
            log.warning("%d delivery(ies) cancelled at shutdown; %d did not stop", len(stuck), len(still))

    # -------------------------------------------------------------- lanes

    def _lane(self, name: str) -> _Lane:
        lane = self._lanes.get(name)
        if lane is None:
            lane = self._lanes[name] = _Lane(name, self._limit(name))
        return lane

    def _fill(self, lane: _Lane) -> None:
        while lane.waiting and len(lane.running) < lane.limit and not self._stopping:
            message_id, fresh = lane.waiting.popleft()
            self._start(lane, message_id, fresh, None)

    def _start(self, lane: _Lane, message_id: str, fresh: bool, preloaded: object) -> None:
        task = asyncio.get_running_loop().create_task(self._one(lane, message_id, fresh, preloaded))
        lane.running.add(task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one(self, lane: _Lane, message_id: str, fresh: bool, preloaded: object) -> None:
        """One delivery. Its place in the lane is given up as soon as the upstream is done
        with the message, so the next one starts while this one's outcome is being stored
        (an fsync); the id stays busy until it is stored."""
        task = asyncio.current_task()
        try:
            tail = await self._deliver(message_id, fresh, lane.name, preloaded)
            lane.running.discard(task)
            self._fill(lane)
            if tail is not None:
                await tail
        except Exception:  # the deliver callback handles its own errors; this is a last resort
            log.exception("delivery of %s failed unexpectedly", message_id)
        finally:
            self._busy.discard(message_id)
            if task in lane.running:
                lane.running.discard(task)
                self._fill(lane)
