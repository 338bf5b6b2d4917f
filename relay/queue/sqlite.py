"""The queue's storage in one sqlite file: accepted messages and per-recipient state.

A 250 after DATA is a promise, so `put()` returns only once the message is fsync'd (WAL
+ synchronous=FULL). To keep many concurrent sessions from paying one fsync each, writes
go through a group commit: every write that arrives while a commit is in flight joins the
next one, so one fsync covers a whole batch. Writes run on one thread with its own
connection; reads (a message's body when its delivery starts, admin listings) on a
second one, which WAL lets run beside the writer. The event loop never blocks on disk.

One relay at a time: the relay holds an exclusive flock on `<spool>.lock`, so a second
relay on the same file is refused, and `relay queue` can tell a message claimed by a
running relay (in flight) from a claim left by one that died (released at its restart).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from keystore.schema import enable_wal
from relay.queue.model import (
    POISON_LIMIT,
    AttemptRecord,
    Body,
    Change,
    Delivery,
    Fate,
    FileBody,
    MessageHeld,
    MessageInfo,
    NotDue,
    QueueDepth,
    QueueItem,
    RecipientInfo,
    SpooledBody,
    UnknownMessage,
)
from relay.queue.schema import MIGRATIONS, SchemaDamaged, check_tables, migrate
from relay.queue.store import SpoolBusy, SpoolError, SpoolFull

__all__ = ["SpoolUnusable", "SqliteQueueStore"]

log = logging.getLogger("relay.queue")

_Op = Callable[[sqlite3.Connection], Any]
# sqlite errors that belong to one op's statement, not to the file: only that op fails
_OP_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)
# A delivery reads a body up to this size whole; a bigger one a piece at a time as it is
# sent (SpooledBody), with its first _BODY_HEAD bytes at hand for a bounce's headers.
_WHOLE_BODY = 1 << 20
_BODY_HEAD = 256 * 1024
_UNFINISHED = "(status = 'pending' OR (status = 'failed' AND notified = 0))"


class SpoolUnusable(SpoolError):
    """The spool file cannot be used at all (not a database, damaged, a schema this program
    does not know, a path it cannot open): waiting will not fix it, an operator must. The
    relay exits 2 on it, which systemd does not restart (deploy/relay.service)."""


# sqlite primary result codes that say the file, not the moment, is the problem
_SQLITE_ERROR, _SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_NOTADB = (
    1, 3, 8, 11, 14, 26)
_DAMAGED = "restore it from a backup, or move it aside to start with an empty spool"
_NOT_OPENABLE = "check that it is a file the relay's user can read and write, in a folder it can write"


class SqliteQueueStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-write")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-read")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pending: list[tuple[_Op, asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0  # fsync'd transactions, and the writes they carried: batch size
        self.writes = 0

    @classmethod
    async def open(cls, path: Path, *, relay: bool) -> SqliteQueueStore:
        """`relay=True`: the running relay (creates the file, takes the lock); else an admin
        command beside it (the spool must exist)."""
        store = cls(path)
        try:
            if relay:
                await asyncio.to_thread(store._lock)
            elif not path.exists():
                raise SpoolError(f"{path}: no spool yet (the relay creates it when it starts)")
            await store._run(store._writer, store._open_writer, relay)
            await store._run(store._reader, store._open_reader)
        except sqlite3.Error as exc:
            await store.close()
            raise _open_error(path, exc) from None
        except PermissionError as exc:
            await store.close()
            reason = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
            raise SpoolUnusable(f"{path}: the spool cannot be opened ({reason}); {_NOT_OPENABLE}") from None
        except BaseException:
            await store.close()
            raise
        return store

    def _lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + 2.0  # `relay queue` holds a shared lock for an instant
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SpoolBusy(f"{self.path}: another relay is running on this spool") from None
                time.sleep(0.05)
        self._lock_fd = fd

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def _relay_running(self) -> bool:
        """Whether a relay holds the spool (its claims are live, not left over)."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self._lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)  # also drops our shared lock
        return False

    def _open_writer(self, create: bool) -> None:
        if create and not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = _connect(self.path, foreign_keys=False)
        enable_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        migrate(conn)  # with foreign keys off: a rebuilt table must not cascade (schema.py)
        check_tables(conn)
        conn.execute("PRAGMA foreign_keys=ON")
        self._wconn = conn

    def _open_reader(self) -> None:
        conn = _connect(self.path)
        conn.execute("PRAGMA query_only=ON")
        self._rconn = conn

    async def close(self) -> None:
        if self._committer is not None:
            await self._committer
        for executor, conn in ((self._writer, self._wconn), (self._reader, self._rconn)):
            if conn is not None:
                await self._run(executor, conn.close)
            executor.shutdown(wait=True)
        self._wconn = self._rconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _read(self, op: _Op) -> Any:
        def run() -> Any:
            assert self._rconn is not None
            try:
                return op(self._rconn)
            except sqlite3.Error as exc:
                raise _classify(exc) from None

        return await self._run(self._reader, run)

    # --------------------------------------------------------- group commit

    async def _write(self, op: _Op) -> Any:
        """Apply op in the next commit; return its result once that commit is on disk."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        if self._committer is None:
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())
        return await future

    async def _commit_loop(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self.commits += 1
                self.writes += len(batch)
                try:
                    results = await self._run(self._writer, self._apply, [op for op, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every waiter must learn the outcome
                    error = _classify(exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                else:
                    for (_, future), result in zip(batch, results, strict=True):
                        if not future.done():
                            future.set_result(result)
        finally:
            self._committer = None

    def _apply(self, ops: list[_Op]) -> list[Any]:
        """One transaction for the batch. An op that raises an error of its own (a bug, a
        constraint) is answered alone: the batch is rolled back and run again without it,
        so it cannot cost its neighbours their commit. A failure of the file (disk full,
        I/O) fails the whole batch."""
        conn = self._wconn
        assert conn is not None
        results: list[Any] = [None] * len(ops)
        todo = list(range(len(ops)))
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for index in todo:
                    try:
                        results[index] = ops[index](conn)
                    except Exception as exc:  # noqa: BLE001 - handed to that op's waiter
                        if isinstance(exc, sqlite3.Error) and not isinstance(exc, _OP_ERRORS):
                            raise
                        results[index] = _Failed(exc)
                        break
                else:
                    conn.execute("COMMIT")
                    return results
                conn.execute("ROLLBACK")
            except BaseException:
                if conn.in_transaction:  # sqlite may already have rolled back (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            todo = [i for i in todo if not isinstance(results[i], _Failed)]

    async def _write_one(self, op: _Op) -> Any:
        result = await self._write(op)
        if isinstance(result, _Failed):
            raise result.error
        return result

    # ------------------------------------------------------- relay's side

    async def put(self, item: QueueItem, *, claimed_by: str | None) -> None:
        await self._write_one(lambda conn: _insert(conn, item, claimed_by))

    async def claim(self, message_id: str, owner: str, now: float) -> Delivery | NotDue | None:
        def op(conn: sqlite3.Connection) -> Delivery | NotDue | None:
            row = conn.execute(
                "SELECT next_attempt FROM message WHERE id = ? AND (claimed IS NULL OR claimed = ?) "
                "AND held = 0 AND delete_requested = 0", (message_id, owner),
            ).fetchone()
            if row is None:
                return None
            if row[0] > now + 0.05:
                return NotDue(row[0])
            conn.execute("UPDATE message SET claimed = ? WHERE id = ?", (owner, message_id))
            return _delivery(conn, message_id, self._body_piece)

        return await self._write_one(op)

    async def load(self, message_id: str) -> Delivery | None:
        return await self._read(lambda conn: _delivery(conn, message_id, self._body_piece))

    async def _body_piece(self, rowid: int, offset: int, length: int) -> bytes:
        """Part of a big body, for SpooledBody: a blob handle per piece, on the read thread."""
        def op(conn: sqlite3.Connection) -> bytes:
            with conn.blobopen("body", "data", rowid, readonly=True) as blob:
                blob.seek(offset)
                return blob.read(length)

        return await self._read(op)

    async def note(self, message_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
        await self._write_one(lambda conn: _set_outcomes(conn, message_id, outcomes))

    async def record(self, record: AttemptRecord) -> Fate:
        return await self._write_one(lambda conn: _record(conn, record))

    async def renew(self, owner: str) -> None:
        """Nothing to do: one relay per sqlite spool, its claims need no lease."""

    async def recover(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM message WHERE delete_requested = 1")
            conn.execute("UPDATE message SET claimed = NULL WHERE claimed IS NOT NULL")

        await self._write_one(op)

    async def schedule(self, owner: str) -> list[tuple[float, str, str | None]]:
        return await self._read(lambda conn: conn.execute(
            "SELECT next_attempt, id, route FROM message WHERE held = 0 AND delete_requested = 0 "
            "AND (claimed IS NULL OR claimed = ?)", (owner,)).fetchall())

    async def changed_elsewhere(self, since: int | None) -> tuple[bool, int]:
        """sqlite's data_version on the writer's connection changes only when another
        connection (`relay queue`) commits: our own writes do not count."""

        def version() -> int:
            assert self._wconn is not None
            return self._wconn.execute("PRAGMA data_version").fetchone()[0]

        current = await self._run(self._writer, version)
        return since is not None and current != since, current

    async def count(self) -> int:
        return await self._read(lambda conn: conn.execute("SELECT count(*) FROM message").fetchone()[0])

    def depth_now(self, timeout: float) -> QueueDepth:
        """The queue's depth, for a thread other than the event loop's (the metrics scrape):
        read on the reader thread, waited for at most `timeout` seconds (TimeoutError);
        RuntimeError once the store is closed."""
        def op() -> QueueDepth:
            if self._rconn is None:
                raise RuntimeError("the spool is closed")
            return _depth(self._rconn)

        future = self._reader.submit(op)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()  # not run later: scrapes that gave up must not pile up on the reader
            raise

    # ------------------------------------------------------------- admin

    async def messages(self, message_id: str | None = None) -> list[MessageInfo]:
        infos = await self._read(lambda conn: _messages(conn, message_id, self._relay_running()))
        if message_id is not None and not infos:
            raise UnknownMessage(message_id)
        return infos

    async def body(self, message_id: str) -> bytes:
        row = await self._read(lambda conn: conn.execute(
            "SELECT data FROM body WHERE message_id = ?", (message_id,)).fetchone())
        if row is None:
            raise UnknownMessage(message_id)
        return row[0]

    async def retry(self, message_id: str) -> Change:
        def op(conn: sqlite3.Connection) -> Change:
            held, in_flight = _state(conn, message_id, self._relay_running())
            if held:
                raise MessageHeld(message_id)
            if in_flight:
                return Change.IN_FLIGHT
            conn.execute("UPDATE message SET next_attempt = 0 WHERE id = ?", (message_id,))
            return Change.DONE

        return await self._write_one(op)

    async def retry_all(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            sql = "UPDATE message SET next_attempt = 0 WHERE held = 0 AND delete_requested = 0"
            if self._relay_running():
                sql += " AND claimed IS NULL"
            return conn.execute(sql).rowcount

        return await self._write_one(op)

    async def hold(self, message_id: str) -> Change:
        return await self._change(message_id, "UPDATE message SET held = 1 WHERE id = ?",
                                  "UPDATE message SET held = 1 WHERE id = ?")

    async def release(self, message_id: str) -> Change:
        sql = "UPDATE message SET held = 0, errors = 0, next_attempt = 0 WHERE id = ?"
        return await self._change(message_id, sql, sql)

    async def delete(self, message_id: str) -> Change:
        return await self._change(message_id, "DELETE FROM message WHERE id = ?",
                                  "UPDATE message SET delete_requested = 1 WHERE id = ?")

    async def _change(self, message_id: str, now_sql: str, in_flight_sql: str) -> Change:
        """One admin change in one transaction; a message a running relay is delivering is
        changed so that the relay applies it when the attempt ends (see _record). Whether a
        relay runs is asked inside the transaction: a relay starting meanwhile cannot claim
        anything until it commits."""

        def op(conn: sqlite3.Connection) -> Change:
            _, in_flight = _state(conn, message_id, self._relay_running())
            conn.execute(in_flight_sql if in_flight else now_sql, (message_id,))
            return Change.IN_FLIGHT if in_flight else Change.DONE

        return await self._write_one(op)


class _Failed:
    """The result of an op that raised: handed to its own waiter only."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def read_depth(path: Path) -> QueueDepth:
    """The depth of the spool at `path`, running relay or not: a read-only connection that
    migrates, creates and claims nothing. SpoolError (one line) if it cannot be read."""
    if not path.exists():
        raise SpoolError(f"{path}: no spool yet (the relay creates it when it starts)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise SpoolError(f"{path}: the spool cannot be opened: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != len(MIGRATIONS):
            newer = "newer than this program" if version > len(MIGRATIONS) else "older than this program"
            raise SpoolError(f"{path}: spool schema version {version} is {newer} ({len(MIGRATIONS)}); "
                             "run the matching relay version")
        return _depth(conn)
    except sqlite3.Error as exc:
        raise SpoolError(f"{path}: the spool cannot be read: {exc}") from None
    finally:
        conn.close()


def _depth(conn: sqlite3.Connection) -> QueueDepth:
    messages, held, oldest = conn.execute(
        "SELECT count(*), coalesce(sum(held), 0), min(created) FROM message WHERE delete_requested = 0"
    ).fetchone()
    oldest_id = None
    if oldest is not None:
        oldest_id = conn.execute("SELECT id FROM message WHERE delete_requested = 0 AND created = ? "
                                 "LIMIT 1", (oldest,)).fetchone()[0]
    return QueueDepth(messages, held, oldest_id, oldest)


def _connect(path: Path, *, foreign_keys: bool = True) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    if foreign_keys:  # a deleted message takes its recipients and body along
        conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _insert(conn: sqlite3.Connection, item: QueueItem, claimed_by: str | None) -> None:
    conn.execute(
        "INSERT INTO message (id, created, mail_from, key_id, mailbox, route, size, next_attempt, claimed) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (item.id, item.created, item.mail_from, item.key_id, item.mailbox, item.route, len(item.body),
         item.created, claimed_by),
    )
    if isinstance(item.body, FileBody):  # copied in chunks: never whole in memory
        rowid = conn.execute("INSERT INTO body (message_id, data) VALUES (?, zeroblob(?))",
                             (item.id, item.body.size)).lastrowid
        with conn.blobopen("body", "data", rowid) as blob:
            for chunk in item.body.chunks():
                blob.write(chunk)
    else:
        conn.execute("INSERT INTO body (message_id, data) VALUES (?, ?)", (item.id, item.body))
    conn.executemany(
        "INSERT OR IGNORE INTO recipient (message_id, address) VALUES (?, ?)",
        [(item.id, rcpt) for rcpt in item.recipients],
    )


def _delivery(
    conn: sqlite3.Connection, message_id: str, piece: Callable[[int, int, int], Awaitable[bytes]],
) -> Delivery | None:
    """The message as a delivery needs it: a body up to _WHOLE_BODY read whole, a bigger
    one as a SpooledBody that reads itself in pieces while it is sent."""
    row = conn.execute(
        "SELECT created, mail_from, key_id, mailbox, route, attempts, "
        "CASE WHEN length(data) <= ? THEN data END, held, delete_requested, length(data), body.rowid "
        "FROM message JOIN body ON body.message_id = message.id WHERE id = ?", (_WHOLE_BODY, message_id),
    ).fetchone()
    if row is None:
        return None
    body: Body = row[6]
    if body is None:
        with conn.blobopen("body", "data", row[10], readonly=True) as blob:
            head = blob.read(_BODY_HEAD)
        body = SpooledBody(head, row[9], functools.partial(piece, row[10]))
    pending, unnotified = [], []
    for address, status, reply in conn.execute(
        f"SELECT address, status, reply FROM recipient WHERE message_id = ? AND {_UNFINISHED} "
        "ORDER BY rowid", (message_id,),
    ):
        if status == "pending":
            pending.append(address)
        else:
            unnotified.append((address, reply or ""))
    return Delivery(
        id=message_id, created=row[0], mail_from=row[1], key_id=row[2], mailbox=row[3], route=row[4],
        attempts=row[5], body=body, pending=pending, unnotified=unnotified, stop=bool(row[7] or row[8]),
    )


def _set_outcomes(conn: sqlite3.Connection, message_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
    conn.executemany(
        "UPDATE recipient SET status = ?, reply = ? WHERE message_id = ? AND address = ? "
        "AND status = 'pending'",
        [(status, reply, message_id, rcpt) for rcpt, (status, reply) in outcomes.items()],
    )


def _record(conn: sqlite3.Connection, record: AttemptRecord) -> Fate:
    row = conn.execute("SELECT held, delete_requested, errors FROM message WHERE id = ?",
                       (record.message_id,)).fetchone()
    if row is None:  # cannot happen while we hold the claim: say so, there is nothing to write to
        log.error("recording an attempt on %s, which is no longer in the spool", record.message_id)
        return Fate.DONE
    held, delete_requested, errors = row
    _set_outcomes(conn, record.message_id, record.outcomes)
    if record.bounce is not None:
        _insert(conn, record.bounce, None)
    if record.notified:
        conn.executemany(
            "UPDATE recipient SET notified = 1 WHERE message_id = ? AND address = ? AND status = 'failed'",
            [(record.message_id, rcpt) for rcpt in record.notified],
        )
    unfinished = conn.execute(
        f"SELECT count(*) FROM recipient WHERE message_id = ? AND {_UNFINISHED}", (record.message_id,),
    ).fetchone()[0]
    if delete_requested or not unfinished:
        conn.execute("DELETE FROM message WHERE id = ?", (record.message_id,))
        return Fate.DELETED if delete_requested and unfinished else Fate.DONE
    last_error = record.last_error
    if record.error is not None:
        errors += 1
        last_error = f"unexpected error ({errors} of {POISON_LIMIT}): {record.error}"
        if errors >= POISON_LIMIT:
            held = 1
            last_error = f"on hold after {errors} unexpected errors; last: {record.error}"
    elif record.attempted:
        errors = 0
    conn.execute(
        "UPDATE message SET attempts = attempts + ?, next_attempt = ?, last_error = coalesce(?, last_error), "
        "errors = ?, held = ?, claimed = NULL WHERE id = ?",
        (int(record.attempted), record.next_attempt, last_error, errors, held, record.message_id),
    )
    return Fate.HELD if held else Fate.RETRY


def _state(conn: sqlite3.Connection, message_id: str, running: bool) -> tuple[bool, bool]:
    """(on hold, in flight) of one message; UnknownMessage if it is not queued (or is
    already being deleted)."""
    row = conn.execute("SELECT held, claimed, delete_requested FROM message WHERE id = ?",
                       (message_id,)).fetchone()
    if row is None or row[2]:
        raise UnknownMessage(message_id)
    return bool(row[0]), running and row[1] is not None


def _messages(conn: sqlite3.Connection, message_id: str | None, running: bool) -> list[MessageInfo]:
    only, params = (" AND id = ?", (message_id,)) if message_id else ("", ())
    rows = conn.execute(
        "SELECT id, created, mail_from, key_id, mailbox, route, attempts, next_attempt, last_error, held, "
        f"claimed, size FROM message WHERE delete_requested = 0{only} ORDER BY created", params,
    ).fetchall()
    recipients: dict[str, list[RecipientInfo]] = {row[0]: [] for row in rows}
    only = " WHERE message_id = ?" if message_id else ""
    for mid, address, status, reply in conn.execute(
        f"SELECT message_id, address, status, reply FROM recipient{only} ORDER BY rowid", params,
    ):
        if mid in recipients:
            recipients[mid].append(RecipientInfo(address=address, status=status, reply=reply))
    return [
        MessageInfo(id=r[0], created=r[1], mail_from=r[2], key_id=r[3], mailbox=r[4], route=r[5],
                    attempts=r[6], next_attempt=r[7], last_error=r[8], held=bool(r[9]),
                    in_flight=running and r[10] is not None, size=r[11], recipients=recipients[r[0]],
                    node=r[10].rpartition(":")[0] if running and r[10] is not None else None)
        for r in rows
    ]


def _open_error(path: Path, exc: sqlite3.Error) -> SpoolError:
    """What opening the spool failed with: SpoolUnusable when the file itself is the problem
    (the relay exits 2 on it), else a SpoolError worth retrying (busy, disk full, I/O)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if "newer than this program" in str(exc):
        return SpoolUnusable(f"{path}: the spool cannot be used: {exc}; run the relay version that wrote it")
    if isinstance(exc, SchemaDamaged) or primary in (_SQLITE_ERROR, _SQLITE_CORRUPT, _SQLITE_NOTADB):
        return SpoolUnusable(f"{path}: the spool cannot be used: {exc}; {_DAMAGED}")
    if primary in (_SQLITE_CANTOPEN, _SQLITE_PERM, _SQLITE_READONLY):
        return SpoolUnusable(f"{path}: the spool cannot be opened: {exc}; {_NOT_OPENABLE}")
    classified = _classify(exc)
    return type(classified)(f"{path}: {classified}")


def _classify(exc: Exception) -> Exception:
    if isinstance(exc, (SpoolError, UnknownMessage, MessageHeld)):
        return exc
    text = str(exc)
    if isinstance(exc, sqlite3.Error) and ("full" in text or getattr(exc, "sqlite_errorcode", 0) == 13):
        return SpoolFull(text)
    return SpoolError(text or repr(exc))

