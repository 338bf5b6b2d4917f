"""The shared queue in PostgreSQL (issue 12): several relays deliver from one database,
each message once; a node that dies leaves its deliveries to the others when its lease
ends; `relay queue` on any node sees and steers the whole cluster.

The store's own semantics (the same for sqlite and PostgreSQL) are tested over both
backends; what only a shared queue has (leases, nodes) on PostgreSQL, with real stores
and real relays on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from relay.queue import SpoolBusy
from relay.queue.model import AttemptRecord, Change, Delivery, Fate, NotDue, QueueItem, new_queue_id
from relay.queue.postgres import PostgresQueueStore
from relay.queue.sqlite import SqliteQueueStore
from tests.support.waiting import wait_until

BODY = b"From: alice@example.com\r\nSubject: shared\r\n\r\nhello\r\n"


def item(rcpts=("bob@example.net",), body: bytes = BODY) -> QueueItem:
    return QueueItem(id=new_queue_id(), created=time.time(), mail_from="alice@example.com",
                     recipients=list(rcpts), key_id="k1", mailbox="alice@example.com", route=None, body=body)


@contextlib.asynccontextmanager
async def pg_store(url: str, node: str, lease: float = 60.0) -> AsyncIterator[PostgresQueueStore]:
    store = await PostgresQueueStore.open(url, relay=True, node=node, lease=lease)
    try:
        yield store
    finally:
        await store.close()


def me(store) -> str:
    """The claim owner of the relay using `store` (node:pid on PostgreSQL)."""
    return getattr(store, "owner", "me:1")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    """The running relay's store on either backend."""
    if request.param == "sqlite":
        opened = await SqliteQueueStore.open(tmp_path / "spool.db", relay=True)
    else:
        opened = await PostgresQueueStore.open(request.getfixturevalue("pg_url"), relay=True, node="n1")
    try:
        yield opened
    finally:
        await opened.close()


# ------------------------------------------------------------ both backends


async def test_a_message_is_claimed_once_recorded_and_gone(store):
    message = item(rcpts=("bob@example.net", "carol@example.net"))
    await store.put(message, claimed_by=None)
    assert await store.count() == 1
    assert [entry[1] for entry in await store.schedule(me(store))] == [message.id]
    delivery = await store.claim(message.id, me(store), time.time())
    assert isinstance(delivery, Delivery)
    assert delivery.pending == ["bob@example.net", "carol@example.net"] and delivery.body == BODY
    assert await store.claim(message.id, "other:2", time.time()) is None  # claimed
    assert await store.schedule("other:2") == []
    fate = await store.record(AttemptRecord(
        message_id=message.id, outcomes={"bob@example.net": ("sent", "250 ok")},
        next_attempt=time.time() + 3600, last_error="451 carol later"))
    assert fate is Fate.RETRY
    assert isinstance(await store.claim(message.id, "other:2", time.time()), NotDue)
    (info,) = await store.messages()
    assert info.pending == ["carol@example.net"] and info.attempts == 1
    assert info.last_error == "451 carol later"
    assert await store.retry(message.id) is Change.DONE
    delivery = await store.claim(message.id, me(store), time.time())
    assert isinstance(delivery, Delivery) and delivery.pending == ["carol@example.net"]
    assert await store.record(AttemptRecord(
        message_id=message.id, outcomes={"carol@example.net": ("sent", "250 ok")})) is Fate.DONE
    assert await store.count() == 0


async def test_admin_changes_on_a_message_in_flight_wait_for_its_attempt(store):
    message = item()
    await store.put(message, claimed_by=me(store))
    assert await store.hold(message.id) is Change.IN_FLIGHT
    (info,) = await store.messages()
    assert info.in_flight and info.held
    record = AttemptRecord(message_id=message.id, attempted=False, next_attempt=time.time())
    assert await store.record(record) is Fate.HELD
    assert await store.schedule(me(store)) == []
    assert await store.release(message.id) is Change.DONE
    assert [entry[1] for entry in await store.schedule(me(store))] == [message.id]
    assert await store.delete(message.id) is Change.DONE
    assert await store.count() == 0


async def test_a_big_body_is_read_back_in_pieces_byte_for_byte(store):
    body = b"Subject: big\r\n\r\n" + bytes(range(256)) * (5 * 4096 + 7)  # over 1 MiB
    message = item(body=body)
    await store.put(message, claimed_by=None)
    delivery = await store.claim(message.id, me(store), time.time())
    assert isinstance(delivery, Delivery) and len(delivery.body) == len(body)
    assert b"".join([chunk async for chunk in delivery.body.chunks(300_000)]) == body
    assert await store.body(message.id) == body


# ------------------------------------------------------------ PostgreSQL only


async def test_a_second_relay_with_the_same_node_name_is_refused(pg_url):
    async with pg_store(pg_url, "alpha"):
        with pytest.raises(SpoolBusy, match="node = 'alpha'"):
            await PostgresQueueStore.open(pg_url, relay=True, node="alpha")
        async with pg_store(pg_url, "beta") as beta:  # another name is another node
            assert [n.node for n in await beta.nodes() if n.running] == ["alpha", "beta"]


async def test_two_nodes_racing_for_the_same_messages_claim_each_once(pg_url):
    async with pg_store(pg_url, "a") as a, pg_store(pg_url, "b") as b:
        messages = [item() for _ in range(40)]
        for message in messages:
            await a.put(message, claimed_by=None)
        now = time.time()
        results = await asyncio.gather(*(s.claim(m.id, s.owner, now) for m in messages for s in (a, b)))
        won = [r for r in results if isinstance(r, Delivery)]
        assert sorted(d.id for d in won) == sorted(m.id for m in messages)  # each once, none lost


async def test_a_dead_nodes_claim_is_taken_over_when_its_lease_ends(pg_url):
    async with pg_store(pg_url, "a", lease=1.0) as a, pg_store(pg_url, "b", lease=1.0) as b:
        message = item(rcpts=("bob@example.net", "carol@example.net"))
        await a.put(message, claimed_by=a.owner)  # a accepted it and is delivering it
        _, version = await b.changed_elsewhere(None)
        assert await b.schedule(b.owner) == [] and await b.claim(message.id, b.owner, time.time()) is None
        (info,) = await b.messages()
        assert info.in_flight and info.node == "a"

        async def b_is_told() -> bool:  # b reads its schedule again when told to
            changed, _ = await b.changed_elsewhere(version)
            return changed and [entry[1] for entry in await b.schedule(b.owner)] == [message.id]

        await wait_until(b_is_told, timeout=3, what="b to see a's lease end")  # a stopped renewing
        taken = await b.claim(message.id, b.owner, time.time())
        assert isinstance(taken, Delivery)
        # a was only slow: what it learnt is kept, the message stays b's
        assert await a.record(AttemptRecord(message_id=message.id, outcomes={
            "bob@example.net": ("sent", "250 ok")}, next_attempt=time.time())) is Fate.RETRY
        (info,) = await a.messages()
        assert info.in_flight and info.node == "b" and info.pending == ["carol@example.net"]
        assert await b.record(AttemptRecord(message_id=message.id, outcomes={
            "carol@example.net": ("sent", "250 ok")})) is Fate.DONE


async def test_renewing_keeps_a_claim_past_its_first_lease(pg_url):
    async with pg_store(pg_url, "a", lease=1.0) as a, pg_store(pg_url, "b", lease=1.0) as b:
        message = item()
        await a.put(message, claimed_by=a.owner)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            await a.renew(a.owner)
            assert await b.claim(message.id, b.owner, time.time()) is None
            await asyncio.sleep(0.3)


async def test_a_restarted_node_releases_its_own_claims_only(pg_url):
    async with pg_store(pg_url, "a") as a, pg_store(pg_url, "b") as b:
        mine, theirs = item(), item()
        await a.put(mine, claimed_by="a:99999")  # a previous run of node a, which died
        await b.put(theirs, claimed_by=b.owner)
        await a.recover()
        assert [entry[1] for entry in await a.schedule(a.owner)] == [mine.id]
        infos = {info.id: info for info in await a.messages()}
        assert not infos[mine.id].in_flight and infos[theirs.id].in_flight


async def test_an_admin_change_from_another_process_tells_every_node(pg_url):
    async with pg_store(pg_url, "a") as a:
        message = item()
        await a.put(message, claimed_by=None)
        _, version = await a.changed_elsewhere(None)
        assert (await a.changed_elsewhere(version))[0] is False
        admin = await PostgresQueueStore.open(pg_url, relay=False)
        try:
            assert await admin.hold(message.id) is Change.DONE
        finally:
            await admin.close()
        assert (await a.changed_elsewhere(version))[0] is True
        assert await a.schedule(a.owner) == []
