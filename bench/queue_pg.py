"""What a shared queue costs per accepted message (issue 12): `put()` commit latency, the
wait a session has between the end of DATA and its 250, on the PostgreSQL queue
(relay/queue/postgres.py) beside the sqlite spool (relay/queue/sqlite.py), same run,
same machine, same disk; 10 KiB (a typical message) and 1 MiB bodies, one put at a time
(median and p99) and 20 sessions at once (puts a second).

A throwaway PostgreSQL is started durable (fsync and synchronous_commit on, as in
production; tests/support/postgres.py); the sqlite spool is fsync'd too (WAL +
synchronous=FULL). A PostgreSQL put is one transaction of four statements (message row,
body, recipients, commit): about five round trips on the loopback, one WAL flush.

Bodies as bytea, or on shared storage? Bytea, by these figures and by what a put must
promise. The 250 may only follow a durable write of the body *and* its row; with the body
in the database that is one commit, one WAL flush, atomic: there is no file without a
row or row without a file to reconcile after a crash, no second system (NFS, an object
store) whose own fsync semantics and outages the relay must then handle, and any node
reads any body over the connection it already has. The cost is WAL volume (a body is
written twice: WAL, then heap/TOAST) and a bigger database to back up. Measured here
(2 shared cores, one disk, defaults):

    sqlite          10 KiB  median  1.05 ms  p99  5.47 ms   5447 puts/s with 20 at once
    sqlite        1024 KiB  median  5.73 ms  p99 35.74 ms    130 puts/s with 20 at once
    postgresql      10 KiB  median  2.62 ms  p99  8.31 ms    650 puts/s with 20 at once
    postgresql    1024 KiB  median 11.19 ms  p99 45.36 ms    116 puts/s with 20 at once

A 1 MiB body costs PostgreSQL about twice sqlite's latency and the same throughput
(both are bound by writing the bytes): the body is not what makes the shared queue
slower. The gap is at 10 KiB with many sessions, where sqlite's group commit shares one
fsync among a batch and each PostgreSQL transaction flushes on its own (a pool of 10);
a file on shared storage would not close that gap, it would add a file fsync to the
same row commit. [server] max_message_size (25 MiB) bounds a single put. An operator
whose mail is mostly large attachments at high rates would move bodies out first (the
body table is apart already, so only the statements touching it would change).

    .venv/bin/python bench/queue_pg.py [--puts 200] [--big-puts 40] [--writers 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.queue import QueueItem, new_queue_id  # noqa: E402
from relay.queue.postgres import PostgresQueueStore  # noqa: E402
from relay.queue.sqlite import SqliteQueueStore  # noqa: E402
from tests.support.postgres import running_postgres  # noqa: E402

Put = Callable[[QueueItem], Awaitable[None]]


def item(size: int) -> QueueItem:
    return QueueItem(id=new_queue_id(), created=time.time(), mail_from="a@example.com",
                     recipients=["b@example.net", "c@example.net"], key_id="k" * 12,
                     mailbox="a@example.com", route=None, body=b"x" * size)


async def latencies(put: Put, size: int, count: int) -> list[float]:
    """Seconds per put, one at a time (a warm-up of 5 left out)."""
    times = []
    for n in range(count + 5):
        message = item(size)
        started = time.perf_counter()
        await put(message)
        if n >= 5:
            times.append(time.perf_counter() - started)
    return times


async def rate(put: Put, size: int, writers: int, each: int) -> float:
    async def writer() -> None:
        for _ in range(each):
            await put(item(size))

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return writers * each / (time.perf_counter() - started)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


async def measure(name: str, put: Put, args: argparse.Namespace) -> list[str]:
    rows = []
    for size, count in ((10 * 1024, args.puts), (1024 * 1024, args.big_puts)):
        times = await latencies(put, size, count)
        per_second = await rate(put, size, args.writers, max(count // args.writers, 2))
        rows.append(f"{name:11} {size // 1024:>6} KiB  median {statistics.median(times) * 1000:7.2f} ms  "
                    f"p99 {p99(times) * 1000:7.2f} ms  {per_second:8.0f} puts/s with {args.writers} at once")
    return rows


async def run(args: argparse.Namespace, url: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        sqlite = await SqliteQueueStore.open(Path(folder) / "spool.db", relay=True)
        pg = await PostgresQueueStore.open(url, relay=True, node="bench")
        try:
            rows = []
            rows += await measure("sqlite", lambda m: sqlite.put(m, claimed_by=None), args)
            rows += await measure("postgresql", lambda m: pg.put(m, claimed_by=pg.owner), args)
        finally:
            await sqlite.close()
            await pg.close()
    print("put() until durable (the wait before the 250):")
    for row in rows:
        print("  " + row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puts", type=int, default=200, help="10 KiB puts timed one at a time")
    parser.add_argument("--big-puts", type=int, default=40, help="1 MiB puts timed one at a time")
    parser.add_argument("--writers", type=int, default=20, help="sessions putting at once")
    args = parser.parse_args()
    with running_postgres(durable=True) as server:
        server.psql("CREATE DATABASE bench")
        asyncio.run(run(args, server.dsn_for("bench")))


if __name__ == "__main__":
    main()
