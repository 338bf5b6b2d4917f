"""What a cluster-wide limit costs (issue 12): one send-rate check per message and one
AUTH-throttle reservation per login, in PostgreSQL (keystore/pglimits.py, the relay's own
code) beside the in-memory ones a single relay uses (relay/policy.py RateLimiter,
keystore/throttle.py FailureLimiter without a ledger).

Starts a throwaway PostgreSQL (tests/support/postgres.py) on loopback, durable as in
production (fsync and synchronous commit on: a rate check is an upsert, so a commit) unless
`--no-durable`. Times, one at a time, `--calls` checks over 1,000 keys (median and p99),
and the rate with 32 in flight over the limits' pool of 8; the memory figures are from the
same run. Each figure is the median of `--rounds` rounds, the kinds taking turns.

    .venv/bin/python bench/limits_pg.py [--calls 5000] [--rounds 3] [--no-durable]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystore.pglimits import PgLimits  # noqa: E402
from keystore.throttle import FailureLimiter  # noqa: E402
from relay.policy import RateLimiter  # noqa: E402
from tests.support.postgres import running_postgres  # noqa: E402

KEYS = 1000
IN_FLIGHT = 32
RATE = 10**9  # never refused: every call does the whole check


async def measure(one: Callable[[int], Awaitable[object]], calls: int) -> dict[str, float]:
    picks = random.Random(7).choices(range(KEYS), k=calls)
    for n in picks[:200]:  # warm: connections, plans
        await one(n)
    latencies = []
    for n in picks:
        began = time.perf_counter()
        await one(n)
        latencies.append(time.perf_counter() - began)
    latencies.sort()
    queue = list(picks)

    async def worker() -> None:
        while queue:
            await one(queue.pop())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return {"median": statistics.median(latencies) * 1e6, "p99": latencies[int(len(latencies) * 0.99)] * 1e6,
            "rate": len(picks) / (time.perf_counter() - began)}


def rate_check(rates) -> Callable[[int], Awaitable[object]]:
    async def one(n: int) -> object:
        assert await rates.allow(f"key{n:06d}", RATE)
        return None
    return one


def login_reservation(limiter: FailureLimiter) -> Callable[[int], Awaitable[object]]:
    async def one(n: int) -> object:
        attempt = await limiter.reserve(f"10.0.{n // 250}.{n % 250}", f"user{n}@example.com", f"k{n}")
        assert attempt is not None
        attempt.release()  # a successful login: nothing written
        return None
    return one


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-durable", dest="durable", action="store_false")
    args = parser.parse_args()
    with running_postgres(durable=args.durable) as server:
        url = server.create_database("bench")
        limits = await PgLimits.open(url, per_minute=RATE)
        try:
            memory = RateLimiter(RATE)
            runs: dict[str, Callable[[int], Awaitable[object]]] = {
                "send rate, memory (RateLimiter)": rate_check(memory),
                "send rate, PostgreSQL (one upsert)": rate_check(limits.rates),
                "AUTH reservation, memory": login_reservation(FailureLimiter(5, 300)),
                "AUTH reservation, PostgreSQL ledger (one read)":
                    login_reservation(FailureLimiter(5, 300, ledger=limits.ledger)),
            }
            found: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
            names = list(runs)
            for turn in range(args.rounds):
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    found[name].append(await measure(runs[name], args.calls))
            version = server.psql("SHOW server_version")
        finally:
            await limits.close()
    print(f"one limit check, {KEYS} keys, {args.calls} calls; PostgreSQL {version} on loopback, "
          f"{'durable (fsync, synchronous commit)' if args.durable else 'not durable (fsync off)'}; "
          f"{IN_FLIGHT} in flight for the rate; medians of {args.rounds} rounds")
    print(f"{'check':48} {'median µs':>10} {'p99 µs':>8} {'checks/s':>9}")
    for name, rounds in found.items():
        median, p99, rate = (statistics.median(r[k] for r in rounds) for k in ("median", "p99", "rate"))
        print(f"{name:48} {median:10.1f} {p99:8.1f} {rate:9.0f}")


if __name__ == "__main__":
    asyncio.run(main())
