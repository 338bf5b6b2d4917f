"""The scheduler alone: timers and lanes, on the real event loop."""

from __future__ import annotations

import asyncio
import time

from relay.queue.schedule import Scheduler


async def test_a_schedule_read_from_the_spool_does_not_drop_newer_timers():
    """The spool's schedule is read while deliveries go on: a message deferred during the
    read is missing from it, and its timer must survive the merge."""
    delivered: list[str] = []

    async def deliver(message_id, fresh, lane, preloaded):
        delivered.append(message_id)

    scheduler = Scheduler(deliver, lambda lane: 2)
    runner = asyncio.create_task(scheduler.run())
    try:
        scheduler.later(time.time() + 0.1, "deferred-meanwhile", "sink")
        scheduler.merge([(time.time() + 0.05, "from-the-spool", "sink")])  # an older snapshot
        deadline = time.monotonic() + 3
        while len(delivered) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(delivered) == ["deferred-meanwhile", "from-the-spool"]
    finally:
        runner.cancel()
        await scheduler.stop(1.0)


async def test_a_lane_runs_at_most_its_limit_and_others_go_on():
    running: dict[str, int] = {"slow": 0, "fast": 0}
    peak = {"slow": 0}
    release = asyncio.Event()
    done: list[str] = []

    async def deliver(message_id, fresh, lane, preloaded):
        running[lane] += 1
        peak["slow"] = max(peak["slow"], running["slow"])
        if lane == "slow":
            await release.wait()
        running[lane] -= 1
        done.append(message_id)

    scheduler = Scheduler(deliver, lambda lane: 2)
    for n in range(5):
        scheduler.now(f"s{n}", "slow")
    scheduler.now("f0", "fast")
    deadline = time.monotonic() + 3
    while "f0" not in done and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert done == ["f0"] and peak["slow"] == 2  # the slow lane is full; the fast one is not held
    release.set()
    while len(done) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert sorted(done) == ["f0", "s0", "s1", "s2", "s3", "s4"] and peak["slow"] == 2
    await scheduler.stop(1.0)


async def test_the_scheduler_stops_when_cancelled_as_a_timer_wakes_it():
    """Python 3.11's asyncio.wait_for returns the inner result, swallowing a cancellation
    that lands while the awaited event is being set: a `later()` right before the queue's
    stop left Scheduler.run looping forever, and the relay's shutdown with it. Each spin
    count lands the cancel at another step of the wake-up."""
    async def deliver(message_id, fresh, lane, preloaded):
        return None

    for spins in range(6):
        scheduler = Scheduler(deliver, lambda lane: 1)
        runner = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0)  # it runs to its wait for a wake-up
        scheduler.later(time.time() + 60, f"m{spins}", "sink")  # sets the wake-up event
        for _ in range(spins):
            await asyncio.sleep(0)
        runner.cancel()
        done, _ = await asyncio.wait([runner], timeout=2)
        assert done, f"Scheduler.run ignored its cancellation ({spins} spins after the wake-up)"
        await scheduler.stop(1.0)
