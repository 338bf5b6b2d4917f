"""Which PostgreSQL driver for the keystore's AUTH path (issue 12): asyncpg or psycopg 3.

Every SMTP AUTH is one read: the key, its mailbox, the workspace's status and the aliases,
in one statement that always returns a row (keystore/store.py `_AUTH_SQL`). This starts a
throwaway PostgreSQL (tests/support/postgres.py: Debian's package, a temporary folder),
builds those four tables with 10,000 mailboxes and keys, and times that statement through

* asyncpg: a pool, a prepared statement per connection (asyncpg prepares and caches);
* psycopg 3 (async, binary): psycopg_pool's AsyncConnectionPool, `prepare=True`;
* sqlite through aiosqlite (today's keystore read path), for scale;

one at a time (latency: median and p99) and with 32 in flight over a pool of 8 (logins per
second), as a busy relay would. Same run, same machine, same data; the drivers take turns
for `--rounds` rounds (the order turns too), and each figure is the median of its rounds,
so a noisy moment does not decide.

    .venv/bin/python bench/pg_drivers.py [--calls 5000] [--rounds 3]

With two cores or more, this process runs on core 0 and the server on core 1.

Needs `pip install asyncpg "psycopg[binary]" psycopg-pool` (not dependencies of the relay
until issue 12 picks one) and PostgreSQL (`apt-get install postgresql`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosqlite  # noqa: E402

from keystore.store import _AUTH_SQL  # noqa: E402
from tests.support.postgres import running_postgres  # noqa: E402

MAILBOXES = 10_000
POOL = 8
IN_FLIGHT = 32

SCHEMA = """
CREATE TABLE workspace (id integer PRIMARY KEY, name text NOT NULL UNIQUE, status text NOT NULL);
CREATE TABLE mailbox (id integer PRIMARY KEY, address text NOT NULL UNIQUE,
                      workspace_id integer NOT NULL REFERENCES workspace(id), status text NOT NULL,
                      route text);
CREATE TABLE alias (address text PRIMARY KEY, mailbox_id integer NOT NULL REFERENCES mailbox(id));
CREATE INDEX alias_mailbox ON alias(mailbox_id);
CREATE TABLE auth_key (id text PRIMARY KEY, status text NOT NULL, expires double precision,
                       secret_hash bytea NOT NULL, prev_hash bytea, prev_valid_until double precision,
                       permissions text NOT NULL, route text, mailbox_id integer,
                       workspace_id integer NOT NULL, rate_limit integer, allow_from text);
"""

# keystore/store.py's own _AUTH_SQL (so the bench times the query the relay runs), in
# PostgreSQL's dialect: $n parameters, string_agg for group_concat
AUTH_SQLITE = _AUTH_SQL
AUTH_PG = _AUTH_SQL.replace("SELECT ? AS kid, ? AS address", "SELECT $1::text AS kid, $2::text AS address") \
    .replace("group_concat(a.address, ' ')", "string_agg(a.address, ' ')")
assert AUTH_PG != _AUTH_SQL and "?" not in AUTH_PG and "group_concat" not in AUTH_PG
AUTH_PSYCOPG = AUTH_PG.replace("$1::text", "%s::text").replace("$2::text", "%s::text")


def rows() -> tuple[list[tuple], list[tuple], list[tuple], list[tuple]]:
    workspaces = [(w, f"ws{w}", "active") for w in range(100)]
    mailboxes = [(m, f"user{m}@ws{m % 100}.example", m % 100, "active", None) for m in range(MAILBOXES)]
    aliases = [(f"alias{m}@ws{m % 100}.example", m) for m in range(0, MAILBOXES, 10)]
    keys = [(f"key{m:08d}", "active", None, bytes(32), None, None, "email.send", None, m, m % 100, None, None)
            for m in range(MAILBOXES)]
    return workspaces, mailboxes, aliases, keys


def logins(count: int) -> list[tuple[str, str]]:
    chosen = random.Random(7).choices(range(MAILBOXES), k=count)
    return [(f"key{m:08d}", f"user{m}@ws{m % 100}.example") for m in chosen]


async def measure(name: str, one: Callable[[str, str], Awaitable[object]], calls: int) -> dict:
    pairs = logins(calls)
    for pair in pairs[:200]:  # warm: connections, prepared statements, caches
        await one(*pair)
    latencies = []
    for pair in pairs:
        began = time.perf_counter()
        row = await one(*pair)
        latencies.append(time.perf_counter() - began)
        assert row is not None
    latencies.sort()
    queue = list(pairs)

    async def worker() -> None:
        while queue:
            await one(*queue.pop())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    rate = len(pairs) / (time.perf_counter() - began)
    return {"name": name, "median": statistics.median(latencies) * 1e6,
            "p99": latencies[int(len(latencies) * 0.99)] * 1e6, "rate": rate}


async def bench_asyncpg(dsn: str, calls: int) -> dict:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=POOL, max_size=POOL)
    try:
        async def one(kid: str, address: str) -> object:
            async with pool.acquire() as conn:
                return await conn.fetchrow(AUTH_PG, kid, address)

        return await measure(f"asyncpg {asyncpg.__version__}", one, calls)
    finally:
        await pool.close()


async def bench_psycopg(dsn: str, calls: int) -> dict:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(dsn, min_size=POOL, max_size=POOL, open=False,
                               kwargs={"autocommit": True, "prepare_threshold": 0})
    await pool.open(wait=True)
    try:
        async def one(kid: str, address: str) -> object:
            async with pool.connection() as conn, conn.cursor(binary=True) as cursor:
                await cursor.execute(AUTH_PSYCOPG, (kid, address), prepare=True)
                return await cursor.fetchone()

        return await measure(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})", one, calls)
    finally:
        await pool.close()


async def bench_sqlite(folder: Path, calls: int) -> dict:
    path = folder / "auth.db"
    workspaces, mailboxes, aliases, keys = rows()
    path.unlink(missing_ok=True)  # a fresh file each round
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA.replace("double precision", "REAL").replace("bytea", "BLOB"))
        db.executemany("INSERT INTO workspace VALUES (?, ?, ?)", workspaces)
        db.executemany("INSERT INTO mailbox VALUES (?, ?, ?, ?, ?)", mailboxes)
        db.executemany("INSERT INTO alias VALUES (?, ?)", aliases)
        db.executemany("INSERT INTO auth_key VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", keys)
    db.close()
    conn = await aiosqlite.connect(path)
    try:
        async def one(kid: str, address: str) -> object:
            return (await conn.execute_fetchall(AUTH_SQLITE, (kid, address)))[0]

        return await measure(f"sqlite {sqlite3.sqlite_version} (aiosqlite, one reader)", one, calls)
    finally:
        await conn.close()


def pin(folder: Path) -> bool:
    """This process (the drivers' side) on core 0, the server on core 1: the postmaster's
    backends, forked later, inherit its affinity. A noisy neighbour on a shared core is
    what made unpinned runs disagree from one run to the next."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        return False
    os.sched_setaffinity(0, {0})
    postmaster = (folder / "data" / "postmaster.pid").read_text().split()[0]
    subprocess.run(["taskset", "-acp", "1", postmaster], capture_output=True, check=True)
    return True


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_postgres() as server, tempfile.TemporaryDirectory() as folder:
        pinned = pin(server.folder)
        dsn = server.create_database("bench")
        server.psql(SCHEMA, "bench")
        workspaces, mailboxes, aliases, keys = rows()
        import asyncpg

        conn = await asyncpg.connect(dsn)
        await conn.copy_records_to_table("workspace", records=workspaces)
        await conn.copy_records_to_table("mailbox", records=mailboxes)
        await conn.copy_records_to_table("alias", records=aliases)
        await conn.copy_records_to_table("auth_key", records=keys)
        await conn.execute("ANALYZE")
        await conn.close()
        version = server.psql("SHOW server_version")
        runs = [lambda: bench_asyncpg(dsn, args.calls), lambda: bench_psycopg(dsn, args.calls),
                lambda: bench_sqlite(Path(folder), args.calls)]
        rounds: list[list[dict]] = [[] for _ in runs]
        for turn in range(args.rounds):
            order = list(range(len(runs)))
            order = order[turn % len(order):] + order[:turn % len(order)]
            for index in order:
                rounds[index].append(await runs[index]())
        results = [{"name": found[0]["name"],
                    **{k: statistics.median(r[k] for r in found) for k in ("median", "p99", "rate")}}
                   for found in rounds]
    print(f"AUTH-path read, {MAILBOXES} mailboxes and keys, {args.calls} logins; PostgreSQL {version} on "
          f"loopback; pool of {POOL}, {IN_FLIGHT} in flight for the rate; medians of {args.rounds} rounds; "
          + ("this process on core 0, the server on core 1" if pinned else "not pinned (one core)"))
    print(f"{'driver':48} {'median µs':>10} {'p99 µs':>8} {'logins/s':>9}")
    for r in results:
        print(f"{r['name']:48} {r['median']:10.0f} {r['p99']:8.0f} {r['rate']:9.0f}")


if __name__ == "__main__":
    asyncio.run(main())
