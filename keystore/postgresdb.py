"""The keystore on PostgreSQL (issue 12: several relays on one keystore), through a psycopg
pool: keystore/sqldb.py's Database.

KeyStore's statements arrive in sqlite's `?` style and are translated once each
(keystore.pg.to_pg, cached). Connections are in autocommit mode, so a read holds no snapshot
open. A write transaction first takes a transaction-scoped advisory lock, one for the whole
keystore: PostgreSQL's own counterpart of sqlite's BEGIN IMMEDIATE. KeyStore's rules are
check-then-write (a workspace's key limit, "already revoked", an address in use); with the
lock they hold across every process and every node, as they do on one sqlite file. Admin
writes are rare and short, so one lock costs nothing a person would notice, and logins
never take it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import psycopg_pool

from keystore import pg, pgschema
from keystore.errors import Conflict, KeystoreUnavailable, StoreError
from keystore.sqldb import Params

__all__ = ["PostgresDatabase", "WRITE_LOCK"]

WRITE_LOCK = "keyrelay:keystore:write"  # the advisory lock every keystore write takes
POOL_TIMEOUT = 5.0  # seconds a statement waits for a connection before "unavailable"
READ_TIMEOUT = 5.0  # seconds a login's read may take before "unavailable" (sqlite's busy_timeout)
# Seconds a keystore session may sit idle inside a transaction before the server ends it
# (idle_in_transaction_session_timeout). KeyStore's transactions run their statements back
# to back; one idle this long belongs to a client that went away (an admin's command whose
# network dropped), and it holds WRITE_LOCK, which every write on every node waits for:
# the server itself would keep it until its TCP keepalive gives up, hours later.
IDLE_TRANSACTION_TIMEOUT = 30.0


class _Statements:
    """fetch / execute / executemany / insert_returning_id on one psycopg connection."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Params = ()) -> list[tuple]:
        with _translated():
            cursor = await self._conn.execute(pg.to_pg(sql), tuple(params))
            return await cursor.fetchall() if cursor.description is not None else []

    async def execute(self, sql: str, params: Params = ()) -> None:
        with _translated():
            await self._conn.execute(pg.to_pg(sql), tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        batch = [tuple(r) for r in rows]
        if not batch:
            return
        with _translated():
            async with self._conn.cursor() as cursor:
                await cursor.executemany(pg.to_pg(sql), batch)

    async def insert_returning_id(self, sql: str, params: Params = ()) -> int:
        rows = await self.fetch(sql + " RETURNING id", params)
        return int(rows[0][0])


class _translated:
    """A unique violation -> Conflict (as sqlite's IntegrityError); a value the database
    cannot hold -> StoreError; any other psycopg error (a lost server, a pool with no
    connection to give) -> KeystoreUnavailable. The
    messages name no URL: psycopg's own never carry the password, and the pool's are ours."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, psycopg.errors.IntegrityError):
            raise Conflict(f"already exists: {_first_line(exc)}") from exc
        if isinstance(exc, psycopg.DataError):
            # the input, not the database: a value past a column's range (SQLSTATE class
            # 22), or text with a NUL, which PostgreSQL's text cannot hold (psycopg says
            # so before sending; sqlite stores it). StoreError: the CLI's message, a 400.
            raise StoreError(f"invalid input: {_first_line(exc)}") from exc
        if isinstance(exc, psycopg.Error):
            raise KeystoreUnavailable(f"keystore query failed: {_first_line(exc)}") from exc
        return False


def _abandon(task: asyncio.Future[list[tuple]]) -> None:
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: nothing to report


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


RETRY_CONNECTION_WAIT = 1.0  # seconds a read waits for a fresh connection after a broken one


class PostgresDatabase:
    """The keystore tables in the PostgreSQL database at `url`."""

    def __init__(self, url: str, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self.where = pg.redact(url)
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, create: bool = False, max_size: int = 8) -> PostgresDatabase:
        """Connect, then `prepare`."""
        database = await cls.connect(url, max_size=max_size)
        try:
            await database.prepare(create=create)
        except BaseException:
            await database.close()
            raise
        return database

    @classmethod
    async def connect(cls, url: str, *, max_size: int = 8) -> PostgresDatabase:
        """A pool on the database, its tables not looked at yet."""
        try:
            idle = f"{int(IDLE_TRANSACTION_TIMEOUT * 1000)}ms"
            pool = await pg.open_pool(url, name="keystore", max_size=max_size, timeout=POOL_TIMEOUT,
                                      settings={"idle_in_transaction_session_timeout": idle})
        except psycopg.Error as exc:
            raise KeystoreUnavailable(_first_line(exc)) from exc
        return cls(url, pool)

    async def prepare(self, *, create: bool) -> None:
        """Bring the tables to this code's version (several relays starting at once migrate
        once). Without `create`, a database with no keystore tables yet is refused, as a
        missing sqlite file is: `keystore init` makes them."""
        if not create and await self.schema_version() == 0:
            raise KeystoreUnavailable(f"{self.where}: no keystore tables in this database "
                                      "(run `keystore init`)")
        try:
            await pg.migrate(self._pool, pgschema.COMPONENT, pgschema.MIGRATIONS)
        except psycopg.Error as exc:
            raise KeystoreUnavailable(f"{self.where}: {_first_line(exc)}") from exc

    async def schema_version(self) -> int:
        """The keystore tables' version (0: none yet)."""
        with _translated():
            async with self._pool.connection() as conn:
                return await pg.schema_version(conn, pgschema.COMPONENT)

    async def fetch(self, sql: str, params: Params = ()) -> list[tuple]:
        """A read. A database restart (or a failover) breaks every pooled connection, and
        each fails its next statement; a read is then tried again on another connection
        (the pool drops a broken one), so a restart costs no login a 454. Writes are not
        repeated: one whose answer was lost may have been done."""
        with _translated():
            wait: float | None = None  # the pool's own timeout the first time
            for _ in range(self._pool.max_size + 1):
                async with self._pool.connection(timeout=wait) as conn:
                    try:
                        return await _Statements(conn).fetch(sql, params)
                    except KeystoreUnavailable:
                        if not conn.broken:
                            raise
                # a server that is down, not restarted: do not wait long for a new connection
                wait = RETRY_CONNECTION_WAIT
            raise KeystoreUnavailable(f"{self.where}: every connection to the database broke")

    async def read(self, sql: str, params: Params = ()) -> list[tuple]:
        """The login path's read (every pooled connection reads without waiting for a
        writer), under a deadline: a database that stalls (its tables locked by a long
        migration or an admin, a server that stopped answering) is KeystoreUnavailable
        (454 4.7.0 at AUTH) within READ_TIMEOUT, as sqlite's busy_timeout is, not a login
        held until the client gives up, which the AUTH throttle counts as a failure (in
        the cluster's ledger: a correct key shut out at every node). The statement runs
        as a task the caller stops waiting for (psycopg's in-place cancel waits for a
        server that may never answer); it is cancelled in the background."""
        task = asyncio.ensure_future(self.fetch(sql, params))
        try:
            done, _ = await asyncio.wait({task}, timeout=READ_TIMEOUT)
        except asyncio.CancelledError:  # the caller went away: so does its statement
            _abandon(task)
            raise
        if not done:
            _abandon(task)
            raise KeystoreUnavailable(f"keystore: no answer within {READ_TIMEOUT:g} s")
        try:
            return task.result()
        except StoreError as exc:  # input the database cannot hold: the login path's callers
            # expect a verdict or KeystoreUnavailable (AUTH's inputs are checked before, so
            # this is a database whose encoding cannot hold some username, e.g. LATIN1)
            raise KeystoreUnavailable(str(exc)) from exc

    async def execute(self, sql: str, params: Params = ()) -> None:
        with _translated():
            async with self._pool.connection() as conn:
                await _Statements(conn).execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        with _translated():
            async with self._pool.connection() as conn:
                await _Statements(conn).executemany(sql, rows)

    async def insert_returning_id(self, sql: str, params: Params = ()) -> int:
        with _translated():
            async with self._pool.connection() as conn:
                return await _Statements(conn).insert_returning_id(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Statements]:
        """One transaction, holding the keystore's write lock until it ends."""
        with _translated():
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (WRITE_LOCK,))
                yield _Statements(conn)

    async def backup(self, target: Path) -> None:
        raise StoreError(f"{self.where}: a PostgreSQL keystore is backed up with pg_dump "
                         "(pg_dump --format=custom), not with `keystore backup`")

    async def close(self) -> None:
        await self._pool.close()
