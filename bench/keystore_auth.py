"""Benchmark `KeyStore.authenticate`, the call made for every SMTP AUTH.

Creates a throwaway keystore (sqlite through aiosqlite, in a temporary folder), fills it with
some workspaces, mailboxes and keys, then times N sequential `await store.authenticate(...)`
calls: successful logins (each also records last_used/last_ip, i.e. one UPDATE), logins with a
well-formed key and a wrong secret (the full database + HMAC path), and malformed keys refused
by the checksum before the database. Finally the same successful logins with many in flight
at once, as a busy relay would issue them.

With --postgres the same lines follow for the same data in a PostgreSQL keystore (issue
12: a throwaway durable server from tests/support/postgres.py on loopback, the keystore
opened as the relay opens it), in the same run, with the ratio to sqlite per line.

    .venv/bin/python bench/keystore_auth.py [--calls 10000] [--dir /path/on/the/real/disk]
                                            [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support.postgres

from keystore import keys  # noqa: E402
from keystore.models import Identity, Reason  # noqa: E402
from keystore.opening import open_keystore  # noqa: E402
from keystore.store import KeyStore  # noqa: E402

CLIENT_IP = "192.0.2.1"


async def populate(store: KeyStore, workspaces: int, mailboxes: int, keys_per_mailbox: int
                   ) -> list[tuple[str, str]]:
    """Returns (username, key) pairs that log in successfully."""
    logins: list[tuple[str, str]] = []
    for w in range(workspaces):
        workspace = f"ws{w}"
        for m in range(mailboxes):
            address = f"user{m}@ws{w}.example"
            await store.add_mailbox(address, workspace=workspace, aliases=[f"alias{m}@ws{w}.example"],
                                    actor="bench")
            for k in range(keys_per_mailbox):
                _, secret = await store.create_key(mailbox=address, name=f"key {k}", actor="bench")
                logins.append((address, secret))
        _, ws_secret = await store.create_key(workspace=workspace, name="workspace key", actor="bench")
        logins.append((f"user0@ws{w}.example", ws_secret))
    return logins


async def timed(calls: int, one: Callable[[int], Awaitable[object]], check: Callable[[object], bool]
                ) -> tuple[list[float], float]:
    """Per-call latencies in microseconds and the wall time of the whole run in seconds."""
    latencies = []
    clock = time.perf_counter_ns
    start = clock()
    for i in range(calls):
        t0 = clock()
        outcome = await one(i)
        latencies.append((clock() - t0) / 1000)
        if not check(outcome):
            raise SystemExit(f"unexpected outcome on call {i}: {outcome!r}")
    return latencies, (clock() - start) / 1e9


BASELINE: dict[str, float] = {}  # the sqlite median of each line, for the ratios


def report(label: str, latencies: Sequence[float], wall: float) -> None:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    median = statistics.median(ordered)
    ratio = f"   x{median / BASELINE[label]:5.2f} sqlite" if label in BASELINE else ""
    BASELINE.setdefault(label, median)
    print(f"{label:34} median {median:8.1f} µs   p99 {p99:8.1f} µs   "
          f"mean {statistics.fmean(ordered):8.1f} µs   {len(ordered) / wall:9,.0f} calls/s{ratio}")


async def bench(args: argparse.Namespace, folder: Path) -> None:
    store = await KeyStore.open(folder / "keystore.db", folder / "pepper", create=True,
                                default_key_limit=10_000)
    await run(args, store, f"{folder}: sqlite {sqlite3.sqlite_version}, aiosqlite {version('aiosqlite')}")
    if args.postgres:
        from tests.support.postgres import running_postgres

        with running_postgres(durable=True) as server:
            store = await open_keystore(url=server.create_database("keystore"),
                                        pepper_file=folder / "pepper", default_key_limit=10_000,
                                        create=True)
            print()
            await run(args, store, f"PostgreSQL on 127.0.0.1:{server.port} (durable), "
                                   f"psycopg {version('psycopg')}")


async def run(args: argparse.Namespace, store: KeyStore, where: str) -> None:
    try:
        logins = await populate(store, args.workspaces, args.mailboxes, args.keys_per_mailbox)
        n = len(logins)
        wrong = [(user, keys.format_key(key.split("_")[1], keys.generate_secret())) for user, key in logins]
        garbled = [(user, key[:-1] + ("A" if key[-1] != "A" else "B")) for user, key in logins]
        # the three must cost the same: nothing may tell an attacker which part was wrong
        nobody = [(f"nobody{i}@nowhere.test", key) for i, (_, key) in enumerate(logins)]
        unknown_key = [(user, keys.format_key("a" * 12, keys.generate_secret())) for user, _ in logins]

        def ok(outcome: object) -> bool:
            return isinstance(outcome, Identity)

        def refused(outcome: object) -> bool:
            return outcome is Reason.BAD_CREDENTIALS

        async def good(i: int):
            return await store.authenticate(*logins[i % n], CLIENT_IP)

        async def bad(i: int):
            return await store.authenticate(*wrong[i % n], CLIENT_IP)

        async def no_mailbox(i: int):
            return await store.authenticate(*nobody[i % n], CLIENT_IP)

        async def no_key(i: int):
            return await store.authenticate(*unknown_key[i % n], CLIENT_IP)

        async def malformed(i: int):
            return await store.authenticate(*garbled[i % n], CLIENT_IP)

        await timed(min(args.calls, 500), good, ok)  # warm-up: page cache, statement cache
        print(f"keystore: {args.workspaces} workspaces, {args.workspaces * args.mailboxes} mailboxes, "
              f"{n} keys in {where}")
        print(f"python {platform.python_version()}; {args.calls:,} sequential calls per line")
        print()
        report("successful login", *await timed(args.calls, good, ok))
        report("bad credentials (wrong secret)", *await timed(args.calls, bad, refused))
        report("bad credentials (unknown mailbox)", *await timed(args.calls, no_mailbox, refused))
        report("bad credentials (unknown key id)", *await timed(args.calls, no_key, refused))
        report("bad credentials (bad checksum)", *await timed(args.calls, malformed, refused))

        # throughput with many logins in flight (sqlite: on its one reader connection)
        flight = args.concurrency
        latencies: list[float] = []

        async def worker(offset: int) -> None:
            for i in range(offset, args.calls, flight):
                t0 = time.perf_counter_ns()
                outcome = await good(i)
                latencies.append((time.perf_counter_ns() - t0) / 1000)
                if not ok(outcome):
                    raise SystemExit(f"unexpected outcome: {outcome!r}")

        start = time.perf_counter()
        await asyncio.gather(*(worker(o) for o in range(flight)))
        report(f"successful login, {flight} in flight", latencies, time.perf_counter() - start)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="authenticate calls per line")
    parser.add_argument("--workspaces", type=int, default=5)
    parser.add_argument("--mailboxes", type=int, default=20, help="mailboxes per workspace")
    parser.add_argument("--keys-per-mailbox", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="logins in flight for the last line")
    parser.add_argument("--dir", type=Path, help="where to create the keystore (default: a temp dir)")
    parser.add_argument("--postgres", action="store_true",
                        help="the same on a throwaway PostgreSQL keystore, with ratios to sqlite")
    args = parser.parse_args()
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be at least 1")
    with tempfile.TemporaryDirectory(prefix="keystore-bench-", dir=args.dir) as folder:
        asyncio.run(bench(args, Path(folder)))


if __name__ == "__main__":
    main()
