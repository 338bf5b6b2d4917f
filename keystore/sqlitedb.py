"""The keystore on sqlite (the embedded default), through aiosqlite: keystore/sqldb.py's
Database on one writing connection and one read-only connection for logins.

A connection runs one statement at a time on its own thread, so a login read queued behind
a write waiting for the database lock (held by a backup or a long CLI transaction) would wait
up to busy_timeout; in WAL mode a reader on its own connection never waits for a writer.
Writers take the database's write lock up front (BEGIN IMMEDIATE), so two processes'
transactions queue on busy_timeout instead of failing half-way.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from keystore.db import open_database, open_reader
from keystore.errors import Conflict, KeystoreUnavailable, StoreError
from keystore.sqldb import Params

__all__ = ["SqliteDatabase"]


class _Statements:
    """fetch / execute / executemany / insert_returning_id on one aiosqlite connection,
    with sqlite's errors turned into the keystore's."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, params: Params = ()) -> list[tuple]:
        with _translated():
            return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def execute(self, sql: str, params: Params = ()) -> None:
        with _translated():
            await self._conn.execute(sql, tuple(params))

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        with _translated():
            await self._conn.executemany(sql, [tuple(r) for r in rows])

    async def insert_returning_id(self, sql: str, params: Params = ()) -> int:
        with _translated():
            cursor = await self._conn.execute(sql, tuple(params))
        return int(cursor.lastrowid)


class _translated:
    """sqlite3.IntegrityError -> Conflict; any other sqlite error, or aiosqlite's
    ValueError once closed -> KeystoreUnavailable."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, sqlite3.IntegrityError):
            raise Conflict(f"already exists: {exc}") from exc
        if isinstance(exc, sqlite3.Error | ValueError):
            raise KeystoreUnavailable(f"keystore query failed: {exc}") from exc
        return False


class SqliteDatabase(_Statements):
    """The keystore file at `path`."""

    def __init__(self, path: Path, conn: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        super().__init__(conn)
        self.where = str(path)
        self._reader = _Statements(reader)
        self._reader_conn = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, *, create: bool = False) -> SqliteDatabase:
        """Create (mode 0600, when `create`) and migrate the file, then connect."""
        try:
            conn = await open_database(path, create=create)
        except (sqlite3.Error, FileNotFoundError) as exc:
            raise KeystoreUnavailable(str(exc)) from exc
        try:
            reader = await open_reader(path)
        except sqlite3.Error as exc:
            await conn.close()
            raise KeystoreUnavailable(str(exc)) from exc
        return cls(path, conn, reader)

    async def read(self, sql: str, params: Params = ()) -> list[tuple]:
        return await self._reader.fetch(sql, params)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Statements]:
        """One write transaction at a time on this connection; BEGIN IMMEDIATE takes the
        database write lock up front so concurrent writers queue on busy_timeout."""
        async with self._write_lock:
            try:
                await self._conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, ValueError) as exc:
                raise KeystoreUnavailable(f"keystore is busy: {exc}") from exc
            try:
                yield self
            except BaseException:
                if self._conn.in_transaction:  # sqlite may already have rolled back
                    await self._conn.execute("ROLLBACK")
                raise
            else:
                with _translated():
                    await self._conn.execute("COMMIT")

    async def backup(self, target: Path) -> None:
        """Online, consistent copy (VACUUM INTO reads one snapshot), created 0600."""
        if target.exists():
            raise StoreError(f"{target}: already exists; refusing to overwrite")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._conn.execute("VACUUM INTO ?", (str(target),))
        except sqlite3.Error as exc:
            raise StoreError(f"backup failed: {exc}") from exc
        target.chmod(0o600)

    async def close(self) -> None:
        await self._reader_conn.close()
        await self._conn.close()
