"""The queue's storage in PostgreSQL, shared by several relays (`[queue] url`, issue 12).

The same semantics as the sqlite spool (relay/queue/sqlite.py), every method one
transaction; what changes is that several nodes deliver from one table:

* A claim is (owner, lease_until). `claim()` takes a message only if it is unclaimed,
  ours, or its lease ended, under `SELECT ... FOR UPDATE SKIP LOCKED`: two nodes
  reaching for one message never both get it, and neither waits on the other. The
  running relay renews the leases of everything it holds every lease/3 (`renew()`), so a
  lease ends only when its node died or lost the database; then any node takes it.
* `record()` releases a claim only if it is still ours: a node that lost its lease
  (it stalled past it) keeps the outcomes it learnt but leaves the message to its new
  owner.
* `recover()` at start releases the claims of this node only (owner `node:*`, left by a
  previous run of it); the other nodes' claims are theirs. A session-level advisory lock
  on the node name refuses a second relay with the same name (SpoolBusy).
* `changed_elsewhere()` tells a node to read the schedule again when an admin changed
  the queue (a counter every admin operation bumps), when a lease ended (a dead node's
  delivery), or when a node stopped or stopped renewing (its retries, which only its
  own timers knew of, are now due to the others). One indexed query every half second;
  LISTEN/NOTIFY would save that query but would need a connection of its own per node
  and a poll anyway for leases that end without anybody saying so.

Errors: anything from the driver is a SpoolError (451 4.3.0), a full disk on the
database server (SQLSTATE 53100) a SpoolFull (452 4.3.1).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from keystore.pg import keepalives, migrate, open_pool, redact, schema_version
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
from relay.queue.pgschema import COMPONENT, MIGRATIONS
from relay.queue.sqlite import SpoolUnusable
from relay.queue.store import SpoolBusy, SpoolError, SpoolFull

__all__ = ["NodeInfo", "PostgresQueueStore"]

log = logging.getLogger("relay.queue")

T = TypeVar("T")
Conn = psycopg.AsyncConnection

_NOW = "extract(epoch FROM clock_timestamp())::float8"  # the database's clock: one for all nodes
_WHOLE_BODY = 1 << 20  # as in sqlite.py: bigger bodies are read in pieces while sent
_BODY_HEAD = 256 * 1024
_UNFINISHED = "(status = 'pending' OR (status = 'failed' AND NOT notified))"
_LIVE_CLAIM = f"(claimed IS NOT NULL AND lease_until >= {_NOW})"
_DISK_FULL = "53100"
_LOCKED_RETRY = 0.25  # seconds before a claim looks again at a row another transaction holds
_SETTLE = 2.0  # seconds a put() whose answer was lost looks for whether it was stored


class CommitUnknown(SpoolError):
    """The connection broke during a transaction: whether it committed is unknown until
    the server process that ran it (`backend_pid`) has ended."""

    def __init__(self, error: SpoolError, backend_pid: int) -> None:
        super().__init__(str(error))
        self.backend_pid = backend_pid


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A relay that shares the queue, as `relay status` lists it."""

    node: str
    owner: str
    started: float
    last_seen: float
    stopped: float | None
    running: bool  # renewed within the lease and not stopped


class PostgresQueueStore:
    def __init__(self, url: str, pool: psycopg_pool.AsyncConnectionPool, *, node: str, lease: float) -> None:
        self.url = url
        self._pool = pool
        self.node = node
        self.owner = f"{node}:{os.getpid()}"
        self.lease = float(lease)
        self._lock_conn: Conn | None = None  # holds the node's advisory lock while the relay runs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: frozenset[str] = frozenset()  # leases seen ended at the last look
        self._live: frozenset[str] = frozenset()  # nodes seen renewing at the last look

    @property
    def where(self) -> str:
        return f"[queue] url {redact(self.url)}"

    @staticmethod
    def redacted(url: str) -> str:
        """The URL for output: any password as ***."""
        return redact(url)

    @classmethod
    async def open(cls, url: str, *, relay: bool, node: str = "", lease: float = 60.0) -> PostgresQueueStore:
        """`relay=True`: the running relay `node` (migrates, takes the node's lock, joins
        queue_node); else an admin command (the tables must exist at this version)."""
        try:
            pool = await open_pool(url, name="queue", max_size=10)
        except psycopg.Error as exc:
            raise SpoolError(f"[queue] url: {exc}") from None
        store = cls(url, pool, node=node, lease=lease)
        store._loop = asyncio.get_running_loop()
        try:
            if relay:
                await store._lock_node()
                await migrate(pool, COMPONENT, MIGRATIONS)
                await store._join()
            else:
                async with pool.connection() as conn:
                    version = await schema_version(conn, COMPONENT)
                if version == 0:
                    raise SpoolError(f"{store.where}: no queue yet (the relay creates it when it starts)")
                if version != len(MIGRATIONS):
                    newer = "newer" if version > len(MIGRATIONS) else "older"
                    raise SpoolUnusable(f"{store.where}: queue schema version {version} is {newer} than this "
                                        f"program's ({len(MIGRATIONS)}); run the matching relay version")
        except psycopg.DataError as exc:  # migrate(): tables newer than this program
            await store.close()
            raise SpoolUnusable(f"{store.where}: {exc}") from None
        except psycopg.Error as exc:
            await store.close()
            raise _classify(exc, store.where) from None
        except BaseException:
            await store.close()
            raise
        return store

    async def _lock_node(self) -> None:
        """One relay per node name: a session-level advisory lock on a connection of its
        own, held until close() (or until the process dies and the server drops it)."""
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                     application_name=f"keyrelay queue lock {self.node}",
                                                     **keepalives(self.url))
        cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                 (f"keyrelay:queue-node:{self.node}",))
        row = await cur.fetchone()
        if not (row and row[0]):
            await conn.close()
            raise SpoolBusy(f"{self.where}: another relay with [cluster] node = {self.node!r} is running on "
                            "this queue; give each relay its own node name")
        self._lock_conn = conn

    async def _keep_lock(self) -> None:
        """The node's lock ends with its connection (the database restarted, the link
        broke), and nothing says so until that connection is used: look (at each renew),
        and take the lock again. Without it a second relay with this node name could start
        and release this one's claims as a dead run's (recover()): deliveries twice."""
        conn = self._lock_conn
        if conn is None:
            return
        try:
            async with asyncio.timeout(self.lease / 6):  # not wait_for: it can swallow a cancellation
                await conn.execute("SELECT 1")
            return
        except (psycopg.Error, TimeoutError):
            pass
        try:
            async with asyncio.timeout(self.lease / 6):
                await self._lock_node()
        except SpoolBusy as exc:
            log.error("this relay lost its node lock while the database was away, and %s", exc)
            return
        except (psycopg.Error, TimeoutError) as exc:
            log.warning("cannot take node %s's lock in the queue again yet: %s", self.node,
                        _classify(exc, self.where) if isinstance(exc, psycopg.Error) else "no answer")
            return
        log.info("node %s's lock in the queue taken again (its connection had ended)", self.node)
        await conn.close()

    async def _join(self) -> None:
        await self._tx(lambda conn: conn.execute(
            f"INSERT INTO queue_node (node, owner, started, last_seen) VALUES (%s, %s, {_NOW}, {_NOW}) "
            "ON CONFLICT (node) DO UPDATE SET owner = excluded.owner, started = excluded.started, "
            "last_seen = excluded.last_seen, stopped = NULL", (self.node, self.owner)))

    async def close(self) -> None:
        if self._lock_conn is not None:
            try:  # others take over this node's retries at once rather than after a lease
                await self._tx(lambda conn: conn.execute(
                    f"UPDATE queue_node SET stopped = {_NOW} WHERE node = %s AND owner = %s",
                    (self.node, self.owner)))
            except SpoolError as exc:
                log.warning("cannot mark node %s stopped in the queue: %s", self.node, exc)
            await self._lock_conn.close()
            self._lock_conn = None
        await self._pool.close()

    async def _tx(self, op: Callable[[Conn], Awaitable[T]], *, pipeline: bool = False) -> T:
        """`op` in one transaction; the driver's errors as SpoolError / SpoolFull.
        `pipeline`: the statements go out without waiting for each one's answer (psycopg's
        pipeline mode), up to the first result `op` reads and at the commit: a put() is one
        round trip instead of five (BEGIN, three INSERTs, COMMIT), the per-message cost
        bench/cluster.py counts."""
        try:
            async with self._pool.connection() as conn:
                pid = conn.info.backend_pid
                try:
                    if pipeline:
                        async with conn.pipeline(), conn.transaction():
                            return await op(conn)
                    async with conn.transaction():
                        return await op(conn)
                except psycopg.Error as exc:
                    if conn.broken:  # the link broke: had the COMMIT gone out, it may have landed
                        raise CommitUnknown(_classify(exc, self.where), pid) from None
                    raise
        except psycopg.Error as exc:
            raise _classify(exc, self.where) from None
        except psycopg_pool.PoolTimeout as exc:
            raise SpoolError(f"{self.where}: {exc}") from None

    # ------------------------------------------------------- relay's side

    async def put(self, item: QueueItem, *, claimed_by: str | None) -> None:
        try:  # a big message waits in a file: read in whole, it goes as one bytea
            data = await asyncio.to_thread(item.body.read) if isinstance(item.body, FileBody) else item.body
        except OSError as exc:
            raise SpoolError(f"cannot read the message to store it: {exc}") from None

        async def op(conn: Conn) -> None:
            await _insert(conn, item, data, claimed_by, self.lease)

        try:
            await self._tx(op, pipeline=True)
        except CommitUnknown as exc:
            if not await self._stored(item.id, exc.backend_pid):
                raise
            log.warning("the database's answer to storing %s was lost (%s); the message is stored",
                        item.id, exc)

    async def _stored(self, message_id: str, backend_pid: int) -> bool:
        """Whether a put() whose answer was lost committed: True only if it surely did (the
        client is then told 250 rather than 451 for a message that would be delivered all
        the same). Its transaction is final once the server process that ran it is gone,
        which it is as soon as it finds its client gone; looked at for a few seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SETTLE
        try:
            while (left := deadline - loop.time()) > 0:
                async with self._pool.connection(timeout=left) as conn:
                    if not (await _one(conn, "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %s)",
                                       (backend_pid,)))[0]:
                        row = await _one(conn, "SELECT EXISTS (SELECT 1 FROM queue_message WHERE id = %s)",
                                         (message_id,))
                        return bool(row[0])
                await asyncio.sleep(0.05)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("cannot tell whether %s was stored: %s", message_id, _classify(exc, self.where)
                        if isinstance(exc, psycopg.Error) else exc)
        return False

    async def claim(self, message_id: str, owner: str, now: float) -> Delivery | NotDue | None:
        claimable = ("SELECT next_attempt FROM queue_message WHERE id = %s AND NOT held AND NOT "
                     f"delete_requested AND (claimed IS NULL OR claimed = %s OR lease_until < {_NOW})")

        async def op(conn: Conn) -> Delivery | NotDue | None:
            row = await _one(conn, claimable + " FOR UPDATE SKIP LOCKED", (message_id, owner))
            if row is None:
                if await _one(conn, claimable, (message_id, owner)) is not None:
                    # claimable, but another transaction has the row this instant (a node
                    # claiming it, our own renew(), an admin): look again shortly rather
                    # than drop the timer of a message that may be ours
                    return NotDue(now + _LOCKED_RETRY)
                return None
            if row[0] > now + 0.05:
                return NotDue(row[0])
            await conn.execute(
                f"UPDATE queue_message SET claimed = %s, lease_until = {_NOW} + %s WHERE id = %s",
                (owner, self.lease, message_id))
            return await _delivery(conn, message_id, self._body_piece)

        return await self._tx(op)

    async def load(self, message_id: str) -> Delivery | None:
        return await self._tx(lambda conn: _delivery(conn, message_id, self._body_piece))

    async def _body_piece(self, message_id: str, offset: int, length: int) -> bytes:
        row = await self._tx(lambda conn: _one(
            conn, "SELECT substring(data FROM %s FOR %s) FROM queue_body WHERE message_id = %s",
            (offset + 1, length, message_id)))
        return b"" if row is None else bytes(row[0])

    async def note(self, message_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
        await self._tx(lambda conn: _set_outcomes(conn, message_id, outcomes))

    async def record(self, record: AttemptRecord) -> Fate:
        return await self._tx(lambda conn: _record(conn, record, self.owner), pipeline=True)

    async def renew(self, owner: str) -> None:
        await self._keep_lock()

        async def op(conn: Conn) -> None:
            await conn.execute(f"UPDATE queue_message SET lease_until = {_NOW} + %s WHERE claimed = %s",
                               (self.lease, owner))
            await conn.execute(f"UPDATE queue_node SET last_seen = {_NOW}, stopped = NULL WHERE node = %s",
                               (self.node,))

        await self._tx(op)

    async def recover(self) -> None:
        prefix = f"{self.node}:"

        async def op(conn: Conn) -> None:
            await conn.execute(
                "DELETE FROM queue_message WHERE delete_requested AND (claimed IS NULL OR "
                f"starts_with(claimed, %s) OR lease_until < {_NOW})", (prefix,))
            await conn.execute("UPDATE queue_message SET claimed = NULL, lease_until = NULL "
                               "WHERE claimed IS NOT NULL AND starts_with(claimed, %s)", (prefix,))

        await self._tx(op)

    async def schedule(self, owner: str) -> list[tuple[float, str, str | None]]:
        async def op(conn: Conn) -> list[tuple[float, str, str | None]]:
            cur = await conn.execute(
                "SELECT next_attempt, id, route FROM queue_message WHERE NOT held AND NOT delete_requested "
                f"AND (claimed IS NULL OR claimed = %s OR lease_until < {_NOW})", (owner,))
            return [tuple(row) for row in await cur.fetchall()]  # type: ignore[misc]

        return await self._tx(op)

    async def changed_elsewhere(self, since: int | None) -> tuple[bool, int]:
        """The admin counter moved, a lease ended that we had not seen ended, or a node
        we saw running stopped or stopped renewing: reschedule."""

        async def op(conn: Conn) -> tuple[int, frozenset[str], frozenset[str]]:
            version = (await _one(conn, "SELECT version FROM queue_version WHERE id = 1", ()))[0]
            cur = await conn.execute(
                f"SELECT id FROM queue_message WHERE claimed IS NOT NULL AND lease_until < {_NOW}")
            expired = frozenset(row[0] for row in await cur.fetchall())
            cur = await conn.execute(
                f"SELECT node FROM queue_node WHERE stopped IS NULL AND last_seen >= {_NOW} - %s",
                (self.lease,))
            return version, expired, frozenset(row[0] for row in await cur.fetchall())

        version, expired, live = await self._tx(op)
        ended = bool(expired - self._expired) or bool(self._live - live)
        self._expired, self._live = expired, live
        return since is not None and (version != since or ended), version

    async def count(self) -> int:
        return (await self._tx(lambda conn: _one(conn, "SELECT count(*) FROM queue_message", ())))[0]

    async def depth(self) -> QueueDepth:
        """The whole cluster's queue (every node's messages)."""

        async def op(conn: Conn) -> QueueDepth:
            messages, held, oldest = await _one(
                conn, "SELECT count(*), count(*) FILTER (WHERE held), min(created) FROM queue_message "
                "WHERE NOT delete_requested", ())
            oldest_id = None
            if oldest is not None:
                oldest_id = (await _one(conn, "SELECT id FROM queue_message WHERE NOT delete_requested "
                                        "ORDER BY created LIMIT 1", ()))[0]
            return QueueDepth(messages, held, oldest_id, oldest)

        return await self._tx(op)

    def depth_now(self, timeout: float) -> QueueDepth:
        """depth() for a thread other than the event loop's (the metrics scrape)."""
        if self._loop is None or self._loop.is_closed():
            raise RuntimeError("the queue is closed")
        future = asyncio.run_coroutine_threadsafe(self.depth(), self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def nodes(self) -> list[NodeInfo]:
        async def op(conn: Conn) -> list[NodeInfo]:
            cur = await conn.execute(
                "SELECT node, owner, started, last_seen, stopped, "
                f"stopped IS NULL AND last_seen >= {_NOW} - %s FROM queue_node ORDER BY node", (self.lease,))
            return [NodeInfo(*row) for row in await cur.fetchall()]

        return await self._tx(op)

    # ------------------------------------------------------------- admin

    async def messages(self, message_id: str | None = None) -> list[MessageInfo]:
        infos = await self._tx(lambda conn: _messages(conn, message_id))
        if message_id is not None and not infos:
            raise UnknownMessage(message_id)
        return infos

    async def body(self, message_id: str) -> bytes:
        row = await self._tx(lambda conn: _one(conn, "SELECT data FROM queue_body WHERE message_id = %s",
                                               (message_id,)))
        if row is None:
            raise UnknownMessage(message_id)
        return bytes(row[0])

    async def retry(self, message_id: str) -> Change:
        async def op(conn: Conn) -> Change:
            held, in_flight = await _state(conn, message_id)
            if held:
                raise MessageHeld(message_id)
            if in_flight:
                return Change.IN_FLIGHT
            await conn.execute("UPDATE queue_message SET next_attempt = 0 WHERE id = %s", (message_id,))
            await _bump(conn)
            return Change.DONE

        return await self._tx(op)

    async def retry_all(self) -> int:
        async def op(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE queue_message SET next_attempt = 0 WHERE NOT held AND NOT delete_requested "
                f"AND NOT {_LIVE_CLAIM}")
            await _bump(conn)
            return cur.rowcount

        return await self._tx(op)

    async def hold(self, message_id: str) -> Change:
        sql = "UPDATE queue_message SET held = true WHERE id = %s"
        return await self._change(message_id, sql, sql)

    async def release(self, message_id: str) -> Change:
        sql = "UPDATE queue_message SET held = false, errors = 0, next_attempt = 0 WHERE id = %s"
        return await self._change(message_id, sql, sql)

    async def delete(self, message_id: str) -> Change:
        return await self._change(message_id, "DELETE FROM queue_message WHERE id = %s",
                                  "UPDATE queue_message SET delete_requested = true WHERE id = %s")

    async def _change(self, message_id: str, now_sql: str, in_flight_sql: str) -> Change:
        """One admin change; a message a node is delivering (a live lease) is changed so
        that its node applies it when the attempt ends (see _record). The row is locked
        first: a claim cannot slip in between the look and the change."""

        async def op(conn: Conn) -> Change:
            _, in_flight = await _state(conn, message_id)
            await conn.execute(in_flight_sql if in_flight else now_sql, (message_id,))
            await _bump(conn)
            return Change.IN_FLIGHT if in_flight else Change.DONE

        return await self._tx(op)


async def _one(conn: Conn, sql: str, params: Sequence[Any]) -> Any:
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


async def _bump(conn: Conn) -> None:
    await conn.execute("UPDATE queue_version SET version = version + 1 WHERE id = 1")


async def _insert(conn: Conn, item: QueueItem, data: bytes, claimed_by: str | None, lease: float) -> None:
    await conn.execute(
        "INSERT INTO queue_message (id, created, mail_from, key_id, mailbox, route, size, next_attempt, "
        "claimed, lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
        f"CASE WHEN %s THEN {_NOW} + %s END)",
        (item.id, item.created, item.mail_from, item.key_id, item.mailbox, item.route, len(data),
         item.created, claimed_by, claimed_by is not None, lease),
    )
    await conn.execute("INSERT INTO queue_body (message_id, data) VALUES (%s, %s)", (item.id, data))
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO queue_recipient (message_id, position, address) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(item.id, n, rcpt) for n, rcpt in enumerate(item.recipients)],
        )


async def _delivery(
    conn: Conn, message_id: str, piece: Callable[[str, int, int], Awaitable[bytes]],
) -> Delivery | None:
    row = await _one(conn, (
        "SELECT created, mail_from, key_id, mailbox, route, attempts, "
        "CASE WHEN octet_length(data) <= %s THEN data END, held, delete_requested, octet_length(data), "
        "CASE WHEN octet_length(data) > %s THEN substring(data FROM 1 FOR %s) END "
        "FROM queue_message JOIN queue_body ON queue_body.message_id = queue_message.id WHERE id = %s"),
        (_WHOLE_BODY, _WHOLE_BODY, _BODY_HEAD, message_id))
    if row is None:
        return None
    body: Body
    if row[6] is not None:
        body = bytes(row[6])
    else:
        body = SpooledBody(bytes(row[10]), row[9], functools.partial(piece, message_id))
    pending, unnotified = [], []
    cur = await conn.execute(
        f"SELECT address, status, reply FROM queue_recipient WHERE message_id = %s AND {_UNFINISHED} "
        "ORDER BY position", (message_id,))
    for address, status, reply in await cur.fetchall():
        if status == "pending":
            pending.append(address)
        else:
            unnotified.append((address, reply or ""))
    return Delivery(
        id=message_id, created=row[0], mail_from=row[1], key_id=row[2], mailbox=row[3], route=row[4],
        attempts=row[5], body=body, pending=pending, unnotified=unnotified, stop=bool(row[7] or row[8]),
    )


async def _set_outcomes(conn: Conn, message_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
    if not outcomes:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE queue_recipient SET status = %s, reply = %s WHERE message_id = %s AND address = %s "
            "AND status = 'pending'",
            [(status, reply, message_id, rcpt) for rcpt, (status, reply) in outcomes.items()],
        )


async def _record(conn: Conn, record: AttemptRecord, owner: str) -> Fate:
    row = await _one(conn, "SELECT held, delete_requested, errors, claimed FROM queue_message WHERE id = %s "
                     "FOR UPDATE", (record.message_id,))
    if row is None:
        log.error("recording an attempt on %s, which is no longer in the queue", record.message_id)
        return Fate.DONE
    held, delete_requested, errors, claimed = row
    await _set_outcomes(conn, record.message_id, record.outcomes)
    if claimed != owner:
        # our lease ended while we delivered and another node holds the message now: the
        # outcomes are facts and stay; its schedule and bounce are the new owner's
        log.warning("message %s was taken over by %s while this node delivered it (its lease ended); "
                    "outcomes kept, the rest left to that node", record.message_id, claimed or "nobody")
        return Fate.RETRY
    if record.bounce is not None:
        bounce = record.bounce.body
        await _insert(conn, record.bounce, bounce if isinstance(bounce, bytes) else bounce.read(), None, 0.0)
    if record.notified:
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE queue_recipient SET notified = true WHERE message_id = %s AND address = %s "
                "AND status = 'failed'", [(record.message_id, rcpt) for rcpt in record.notified])
    unfinished = (await _one(
        conn, f"SELECT count(*) FROM queue_recipient WHERE message_id = %s AND {_UNFINISHED}",
        (record.message_id,)))[0]
    if delete_requested or not unfinished:
        await conn.execute("DELETE FROM queue_message WHERE id = %s", (record.message_id,))
        return Fate.DELETED if delete_requested and unfinished else Fate.DONE
    last_error = record.last_error
    if record.error is not None:
        errors += 1
        last_error = f"unexpected error ({errors} of {POISON_LIMIT}): {record.error}"
        if errors >= POISON_LIMIT:
            held = True
            last_error = f"on hold after {errors} unexpected errors; last: {record.error}"
    elif record.attempted:
        errors = 0
    await conn.execute(
        "UPDATE queue_message SET attempts = attempts + %s, next_attempt = %s, "
        "last_error = coalesce(%s, last_error), errors = %s, held = %s, claimed = NULL, lease_until = NULL "
        "WHERE id = %s",
        (int(record.attempted), record.next_attempt, last_error, errors, held, record.message_id),
    )
    return Fate.HELD if held else Fate.RETRY


async def _state(conn: Conn, message_id: str) -> tuple[bool, bool]:
    """(on hold, in flight: a node holds a live lease on it), the row locked for the change."""
    row = await _one(conn, f"SELECT held, {_LIVE_CLAIM}, delete_requested FROM queue_message WHERE id = %s "
                     "FOR UPDATE", (message_id,))
    if row is None or row[2]:
        raise UnknownMessage(message_id)
    return bool(row[0]), bool(row[1])


async def _messages(conn: Conn, message_id: str | None) -> list[MessageInfo]:
    only, params = (" AND id = %s", (message_id,)) if message_id else ("", ())
    cur = await conn.execute(
        "SELECT id, created, mail_from, key_id, mailbox, route, attempts, next_attempt, last_error, held, "
        f"{_LIVE_CLAIM}, size, claimed FROM queue_message WHERE NOT delete_requested{only} "
        "ORDER BY created, id",
        params)
    rows = await cur.fetchall()
    recipients: dict[str, list[RecipientInfo]] = {row[0]: [] for row in rows}
    where = " WHERE message_id = %s" if message_id else ""
    cur = await conn.execute(
        f"SELECT message_id, address, status, reply FROM queue_recipient{where} "
        "ORDER BY message_id, position",
        params)
    for mid, address, status, reply in await cur.fetchall():
        if mid in recipients:
            recipients[mid].append(RecipientInfo(address=address, status=status, reply=reply))
    return [
        MessageInfo(id=r[0], created=r[1], mail_from=r[2], key_id=r[3], mailbox=r[4], route=r[5],
                    attempts=r[6], next_attempt=r[7], last_error=r[8], held=bool(r[9]), in_flight=bool(r[10]),
                    size=r[11], recipients=recipients[r[0]],
                    node=r[12].rpartition(":")[0] if r[10] and r[12] else None)
        for r in rows
    ]


def _classify(exc: psycopg.Error, where: str) -> SpoolError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    if exc.sqlstate == _DISK_FULL:
        return SpoolFull(f"{where}: {first}")
    return SpoolError(f"{where}: {first}")
