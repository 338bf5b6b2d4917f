"""The durable spool: accepted messages and per-recipient delivery state, in one sqlite file.

A 250 after DATA is a promise, so `put()` returns only once the message is fsync'd
(WAL + synchronous=FULL). To keep many concurrent sessions from paying one fsync each,
writes go through a group commit: every write that arrives while a commit is in flight
joins the next one, so one fsync covers a whole batch. All database work happens on one
dedicated thread with its own connection; the event loop never blocks on disk.

sqlite (rather than one file per message) also gives `relay queue` commands and the
running relay a consistent, concurrent view of the same queue for free.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["QueueItem", "Spool", "SpoolError", "SpoolFull", "new_queue_id"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    mail_from TEXT NOT NULL,
    key_id TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    route TEXT,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    reply TEXT,
    PRIMARY KEY (message_id, address)
);
"""

_Op = Callable[[sqlite3.Connection], None]


class SpoolError(Exception):
    """The spool could not record a write; the client should retry later (451 4.3.0)."""


class SpoolFull(SpoolError):
    """The disk is full (452 4.3.1)."""


@dataclass(slots=True, kw_only=True)
class QueueItem:
    """One accepted message and the recipients still waiting for delivery."""

    id: str
    created: float
    mail_from: str
    recipients: list[str]
    key_id: str
    mailbox: str
    route: str | None
    body: bytes = field(repr=False)
    attempts: int = 0
    next_attempt: float = 0.0


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[_Op, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0  # fsync'd transactions, and the writes they carried: batch size
        self.writes = 0

    @classmethod
    async def open(cls, path: Path) -> Spool:
        spool = cls(path)
        await spool._call(spool._open)
        return spool

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def data_version(self) -> int:
        """Changes when another connection (the `relay queue` CLI) commits to the spool."""
        assert self._conn is not None
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    async def close(self) -> None:
        if self._committer is not None:
            await self._committer
        if self._conn is not None:
            await self._call(self._conn.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., object], *args: object):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --------------------------------------------------------- group commit

    async def _write(self, op: _Op) -> None:
        """Apply op in the next commit and return once that commit is on disk."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())
        await future

    async def _commit_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self.commits += 1
                self.writes += len(batch)
                try:
                    await self._call(self._apply, [op for op, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiter must learn the outcome
                    error = _classify(exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._committer = None

    def _apply(self, ops: list[_Op]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                op(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # sqlite may already have rolled back (e.g. disk full)
                conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ messages

    async def put(self, item: QueueItem) -> None:
        """Store a newly accepted message durably (the caller then answers 250)."""

        await self._write(lambda conn: _insert(conn, item))

    async def record_attempt(
        self, item: QueueItem, outcomes: Iterable[tuple[str, str, str]], *,
        next_attempt: float | None, last_error: str | None, bounce: QueueItem | None = None,
    ) -> None:
        """Store (recipient, status, reply) outcomes; with no next_attempt the message is
        finished and removed. A bounce for the failures is stored in the same commit, so a
        crash cannot lose it."""
        rows = [(status, reply, item.id, rcpt) for rcpt, status, reply in outcomes]

        def update(conn: sqlite3.Connection) -> None:
            if bounce is not None:
                _insert(conn, bounce)
            if next_attempt is None:
                conn.execute("DELETE FROM message WHERE id = ?", (item.id,))
                return
            conn.executemany(
                "UPDATE recipient SET status = ?, reply = ? WHERE message_id = ? AND address = ?",
                rows,
            )
            conn.execute(
                "UPDATE message SET attempts = attempts + 1, next_attempt = ?, last_error = ? "
                "WHERE id = ?",
                (next_attempt, last_error, item.id),
            )

        await self._write(update)

    async def due(self) -> list[tuple[float, str]]:
        """(next_attempt, id) of every message waiting in the spool and not on hold."""

        def query() -> list[tuple[float, str]]:
            assert self._conn is not None
            return self._conn.execute("SELECT next_attempt, id FROM message WHERE held = 0").fetchall()

        return await self._call(query)

    async def changed_elsewhere(self, since: int | None) -> tuple[bool, int]:
        version = await self._call(self.data_version)
        return since is not None and version != since, version

    async def load(self, message_id: str) -> QueueItem | None:
        def query() -> QueueItem | None:
            assert self._conn is not None
            row = self._conn.execute(
                "SELECT id, created, mail_from, key_id, mailbox, route, body, attempts, next_attempt "
                "FROM message WHERE id = ? AND held = 0", (message_id,),
            ).fetchone()
            if row is None:
                return None
            rcpts = [r[0] for r in self._conn.execute(
                "SELECT address FROM recipient WHERE message_id = ? AND status = 'pending' "
                "ORDER BY rowid", (message_id,))]
            return QueueItem(
                id=row[0], created=row[1], mail_from=row[2], key_id=row[3], mailbox=row[4],
                route=row[5], body=row[6], attempts=row[7], next_attempt=row[8], recipients=rcpts,
            )

        return await self._call(query)

    async def count(self) -> int:
        def query() -> int:
            assert self._conn is not None
            return self._conn.execute("SELECT count(*) FROM message").fetchone()[0]

        return await self._call(query)


def new_queue_id() -> str:
    """Sortable by time (ms, hex), unique by 48 random bits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


def _insert(conn: sqlite3.Connection, item: QueueItem) -> None:
    conn.execute(
        "INSERT INTO message (id, created, mail_from, key_id, mailbox, route, body, next_attempt) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (item.id, item.created, item.mail_from, item.key_id, item.mailbox, item.route, item.body,
         item.next_attempt),
    )
    conn.executemany(
        "INSERT INTO recipient (message_id, address) VALUES (?, ?)",
        [(item.id, rcpt) for rcpt in item.recipients],
    )


def _classify(exc: Exception) -> SpoolError:
    text = str(exc)
    if isinstance(exc, sqlite3.Error) and ("full" in text or getattr(exc, "sqlite_errorcode", 0) == 13):
        return SpoolFull(text)
    return SpoolError(text)
