"""Opening the keystore database: file mode, pragmas, schema version.

WAL lets the CLI write while a running relay reads; busy_timeout makes a writer wait for
the other instead of failing; synchronous=NORMAL in WAL mode is still crash-safe for the
database (a power cut can lose at most the last admin commits, never corrupt it).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import aiosqlite

from keystore.schema import enable_wal, migrate

__all__ = ["BUSY_TIMEOUT_MS", "open_database", "open_reader", "prepare_database"]

BUSY_TIMEOUT_MS = 5000


def prepare_database(path: Path, *, create: bool) -> None:
    """Create (mode 0600) and migrate the database file; refuse a missing one unless create."""
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"{path}: keystore not found (run `keystore init`)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process (a concurrent `keystore init`) created it first
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        enable_wal(conn)
        migrate(conn)
    finally:
        conn.close()


async def open_database(path: Path, *, create: bool = False) -> aiosqlite.Connection:
    await asyncio.to_thread(prepare_database, path, create=create)
    conn = await aiosqlite.connect(path, isolation_level=None)
    for pragma in (
        f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
        "PRAGMA foreign_keys=ON",
        "PRAGMA synchronous=NORMAL",
    ):
        await conn.execute(pragma)
    return conn


async def open_reader(path: Path) -> aiosqlite.Connection:
    """A second, read-only connection for logins. A connection runs one statement at a
    time on its own thread, so a login read queued behind a write waiting for the database
    lock (held by a backup or a long CLI transaction) would wait up to busy_timeout; in WAL
    mode a reader on its own connection never waits for a writer."""
    conn = await aiosqlite.connect(path, isolation_level=None)
    for pragma in (f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}", "PRAGMA query_only=ON"):
        await conn.execute(pragma)
    return conn
