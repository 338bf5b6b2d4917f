"""The spool's group commit, measured: durable puts per second with one writer at a time
(every put pays its own fsync) and with many concurrent sessions (puts share commits).

    .venv/bin/python bench/spool.py [--writers 20] [--puts 100] [--size 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.queue import QueueItem, new_queue_id  # noqa: E402
from relay.queue.sqlite import SqliteQueueStore  # noqa: E402


def item(size: int) -> QueueItem:
    return QueueItem(id=new_queue_id(), created=time.time(), mail_from="a@example.com",
                     recipients=["b@example.net"], key_id="k" * 12, mailbox="a@example.com",
                     route=None, body=b"x" * size)


async def run(writers: int, puts: int, size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        spool = await SqliteQueueStore.open(Path(folder) / "spool.db", relay=True)

        async def writer() -> None:
            for _ in range(puts):
                await spool.put(item(size), claimed_by="bench")

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - started
        per_commit = spool.writes / spool.commits
        await spool.close()
    return writers * puts / elapsed, per_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--puts", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    total = args.writers * args.puts
    alone, _ = asyncio.run(run(1, total // 4, args.size))
    shared, batch = asyncio.run(run(args.writers, args.puts, args.size))
    print(f"durable puts of {args.size} B (fsync'd, sqlite WAL synchronous=FULL)")
    print(f"  one writer               {alone:8.0f} puts/s   (one fsync per put)")
    print(f"  {args.writers} concurrent writers   {shared:8.0f} puts/s   ({batch:.1f} puts per commit)")
    print(f"  ratio                    {shared / alone:8.1f}x")


if __name__ == "__main__":
    main()
