"""Cluster-wide send rates and AUTH failure counts in PostgreSQL (issue 12): the
implementations of keystore/clusterlimits.py's interfaces that several relays share.

They live in the keystore's database (component "limits", migrated with keystore.pg) on
a pool of their own, so a slow keystore query never holds up a rate check or the other
way round.

* Send rates: one row per key, a token bucket. One statement per message (an upsert that
  refills the bucket by the time elapsed and takes a token, RETURNING whether it could).
  Time is the database's (`clock_timestamp()`), so the nodes' clocks do not matter; the
  row lock the upsert takes makes concurrent messages of one key, from any node, queue
  up for it, so N at once get exactly what the bucket holds.
* AUTH failures: one row per failure and counter slot, read for a login's slots in one
  statement (each count capped at what the throttle compares it with) and written in one
  (the refusal is padded anyway, so the client waits no longer).

Both tables are UNLOGGED: no write-ahead log, so a message's upsert commits without waiting
for a disk flush (bench/limits_pg.py: about a third of the cost on a durable server). What
that gives up is fitting for counters: a database crash, or a failover to a standby (which
never had them), empties them, so every bucket starts full and failed logins are forgotten,
as a relay's restart does to its in-memory limits.

Rows that say nothing any more are pruned in the background: a bucket untouched for a
minute is full (equal to no row), a failure older than the throttle's window counts for
nothing. Every statement runs under a deadline (`timeout`): a database that does not
answer is LimitsUnavailable, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import psycopg_pool

from keystore import pg
from keystore.clusterlimits import LimitsUnavailable, SlotCount

__all__ = ["MIGRATIONS", "PgFailureLedger", "PgLimits", "PgSendRates"]

log = logging.getLogger("keystore.limits")

COMPONENT = "limits"

MIGRATIONS = [
    """
    CREATE UNLOGGED TABLE keyrelay_send_rate (
        key_id text PRIMARY KEY,
        tokens double precision NOT NULL,
        stamp timestamptz NOT NULL,
        allowed boolean NOT NULL
    );
    CREATE INDEX keyrelay_send_rate_stamp ON keyrelay_send_rate (stamp);
    CREATE UNLOGGED TABLE keyrelay_auth_failure (
        slot bytea NOT NULL,
        at timestamptz NOT NULL
    );
    CREATE INDEX keyrelay_auth_failure_slot_at ON keyrelay_auth_failure (slot, at);
    CREATE INDEX keyrelay_auth_failure_at ON keyrelay_auth_failure (at);
    """,
]

# The bucket is refilled by (now - stamp) * rate / 60 tokens, up to `rate`; a message
# takes one if there is one. `excluded.stamp` is this statement's clock_timestamp(), read
# once, before it waits for the row: a statement that got the row after a later one keeps
# the later stamp (else the next message would be refilled for that stretch twice). A
# rate lowered since the last message caps the tokens at the new rate.
_SEND_ONE = """
INSERT INTO keyrelay_send_rate AS b (key_id, tokens, stamp, allowed)
VALUES (%(key)s, %(rate)s - 1, clock_timestamp(), true)
ON CONFLICT (key_id) DO UPDATE SET (tokens, stamp, allowed) = (
    SELECT CASE WHEN r.refilled >= 1 THEN r.refilled - 1 ELSE r.refilled END,
           greatest(b.stamp, excluded.stamp), r.refilled >= 1
    FROM (SELECT least(%(rate)s::double precision,
                       b.tokens + greatest(0, extract(epoch FROM excluded.stamp - b.stamp))
                       * %(rate)s / 60.0) AS refilled) AS r
)
RETURNING allowed
"""

# now() (this statement's start: the connections are in autocommit) lets the index find
# the window's rows; failures are stamped with clock_timestamp(), the same clock.
_COUNT_FAILURES = """
SELECT s.slot, c.n, extract(epoch FROM now() - c.newest)::double precision
FROM unnest(%(slots)s::bytea[], %(caps)s::int[]) AS s(slot, cap)
CROSS JOIN LATERAL (
    SELECT count(*) AS n, max(f.at) AS newest FROM (
        SELECT at FROM keyrelay_auth_failure
        WHERE slot = s.slot AND at > now() - make_interval(secs => %(window)s)
        ORDER BY at DESC LIMIT s.cap
    ) AS f
) AS c
WHERE c.n > 0
"""

_ADD_FAILURES = """
INSERT INTO keyrelay_auth_failure (slot, at)
SELECT unnest(%(slots)s::bytea[]), clock_timestamp()
"""

_PRUNE_RATES = "DELETE FROM keyrelay_send_rate WHERE stamp < clock_timestamp() - interval '61 seconds'"
_PRUNE_FAILURES = "DELETE FROM keyrelay_auth_failure WHERE at < clock_timestamp() - make_interval(secs => %s)"


class _Db:
    """One pool and a deadline for every statement: LimitsUnavailable, not a hang.

    The statement runs as a task of its own that the caller stops waiting for at the
    deadline: cancelling psycopg's query in place waits for the server to confirm the
    cancellation, which a database that does not answer never does (psycopg gives up
    after some seconds and drops the connection, in the background here)."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def execute(self, sql: str, params: object) -> list[tuple]:
        task = asyncio.ensure_future(self._run(sql, params))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:  # our caller went away: so does its statement
            _abandon(task)
            raise
        if not done:
            _abandon(task)
            raise LimitsUnavailable("no answer in time")
        try:
            return task.result()
        except (pg.PgError, OSError) as exc:  # the pool's PoolTimeout and PoolClosed are PgErrors
            raise LimitsUnavailable(_why(exc)) from None

    async def _run(self, sql: str, params: object) -> list[tuple]:
        async with self.pool.connection(timeout=self.timeout) as conn:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            return await cur.fetchall() if cur.description else []


def _abandon(task: asyncio.Future[list[tuple]]) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: nothing to report


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class PgSendRates:
    """keystore.clusterlimits.SendRates over the cluster's database."""

    def __init__(self, db: _Db, per_minute: int) -> None:
        self._db = db
        self.per_minute = per_minute
        self._answering = True  # False from a failed check until one works: logged once each way

    async def allow(self, key_id: str, per_minute: int | None = None) -> bool:
        rate = per_minute if per_minute is not None else self.per_minute
        if rate <= 0:
            return True
        try:
            rows = await self._db.execute(_SEND_ONE, {"key": key_id, "rate": rate})
        except LimitsUnavailable as exc:
            if self._answering:
                self._answering = False
                log.warning("send rates cannot be checked (%s): messages are refused with 451 4.3.0 "
                            "until they can", exc)
            raise
        if not self._answering:
            self._answering = True
            log.warning("send rates can be checked again")
        return bool(rows[0][0])


class PgFailureLedger:
    """keystore.clusterlimits.FailureLedger over the cluster's database."""

    def __init__(self, db: _Db) -> None:
        self._db = db
        self.retention = 0.0  # the longest window asked for lately: what pruning keeps

    async def counts(self, slots: Sequence[tuple[bytes, int]], window: float) -> dict[bytes, SlotCount]:
        self.retention = max(self.retention, window)
        rows = await self._db.execute(_COUNT_FAILURES, {
            "slots": [slot for slot, _ in slots], "caps": [cap for _, cap in slots], "window": window,
        })
        return {bytes(slot): (int(n), float(age)) for slot, n, age in rows}

    async def add(self, slots: Sequence[bytes], window: float) -> None:
        self.retention = max(self.retention, window)
        await self._db.execute(_ADD_FAILURES, {"slots": list(slots)})


class PgLimits:
    """The relay's cluster-wide limits: its pool, the two implementations, the pruning."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, *, per_minute: int, timeout: float,
                 prune_every: float) -> None:
        self._pool = pool
        db = _Db(pool, timeout)
        self._db = db
        self.rates = PgSendRates(db, per_minute)
        self.ledger = PgFailureLedger(db)
        self._prune_every = prune_every
        self._pruner: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, per_minute: int, timeout: float = 2.0, prune_every: float = 60.0,
                   max_size: int = 8) -> PgLimits:
        """Connect, bring the tables up to date and start pruning; psycopg's
        OperationalError (the URL's password left out) if the database cannot be used."""
        pool = await pg.open_pool(url, name="limits", max_size=max_size)
        try:
            await pg.migrate(pool, COMPONENT, MIGRATIONS)
        except BaseException:
            await pool.close()
            raise
        limits = cls(pool, per_minute=per_minute, timeout=timeout, prune_every=prune_every)
        limits._pruner = asyncio.get_running_loop().create_task(limits._prune_loop())
        return limits

    async def prune(self) -> None:
        """Drop rows that no longer count (full buckets, failures past the window)."""
        await self._db.execute(_PRUNE_RATES, None)
        if self.ledger.retention > 0:
            await self._db.execute(_PRUNE_FAILURES, (self.ledger.retention,))

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self._prune_every)
            try:
                await self.prune()
            except LimitsUnavailable as exc:  # the next round tries again
                log.debug("limits: pruning failed: %s", exc)

    async def close(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        await self._pool.close()
