"""The shared queue in PostgreSQL (issue 12): several relays deliver from one database,
each message once; a node that dies leaves its deliveries to the others when its lease
ends; `relay queue` on any node sees and steers the whole cluster.

The store's own semantics (the same for sqlite and PostgreSQL) are tested over both
backends; what only a shared queue has (leases, nodes) on PostgreSQL, with real stores
and real relays on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import time
from collections.abc import AsyncIterator

import aiosmtplib
import psycopg
import pytest

from relay.queue import SpoolBusy
from relay.queue.model import AttemptRecord, Change, Delivery, Fate, NotDue, QueueItem, new_queue_id
from relay.queue.postgres import PostgresQueueStore
from relay.queue.sqlite import SqliteQueueStore
from tests.conftest import running_relay
from tests.support.fs import fill, small_filesystem
from tests.support.procs import free_port, prepare_relay_folder, start_relay_process
from tests.support.relayrun import client_tls
from tests.support.sink import Sink
from tests.support.waiting import wait_until
from tests.test_check_config import Folder
from tests.test_metrics import metrics_table, scrape_until, value
from tests.test_queue_cli import q
from tests.test_queue_integrity import queue_rows, wait_rows
from tests.test_status_cli import status_cli

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


# ------------------------------------------------------------ real relays


def cluster_parts(pg_url: str, node: str, lease: str = "5s") -> dict:
    """running_relay() options: the queue in `pg_url`, this relay named `node`."""
    return {"queue": f'url = "{pg_url}"',
            "edit": lambda text: text + f'\n[cluster]\nnode = "{node}"\nlease = "{lease}"\n'}


@contextlib.asynccontextmanager
async def two_relays(tmp_path, sink, pg_url: str, **parts) -> AsyncIterator[tuple]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (running_relay(tmp_path / "a", sink, **cluster_parts(pg_url, "node-a"), **parts) as a,
                running_relay(tmp_path / "b", sink, **cluster_parts(pg_url, "node-b"), **parts) as b):
        for h in (a, b):
            await h.mailbox("alice@example.com")
        yield a, b


async def send_from(h, subject: str, rcpt: str = "bob@example.net") -> None:
    client = await h.login("alice@example.com", await h.key("alice@example.com", name=subject))
    await client.sendmail("alice@example.com", [rcpt],
                          f"From: alice@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n".encode())
    await client.quit()


def subjects(sink) -> list[str]:
    return sorted(m.text.split("Subject: ")[1].split("\r\n")[0] for m in sink.messages)


async def test_two_relays_on_one_queue_deliver_each_message_once(tmp_path, sink, pg_url):
    async with two_relays(tmp_path, sink, pg_url) as (a, b):
        for n in range(6):
            await send_from((a, b)[n % 2], f"message {n}")
        await sink.wait_for(6)
        async def drained() -> bool:
            return await a.relay.queue.store.count() == 0

        await wait_until(drained, what="the shared queue to drain")
        await asyncio.sleep(0.6)  # a follow period of each node: nothing is delivered again
        assert subjects(sink) == [f"message {n}" for n in range(6)]


async def test_queue_list_on_either_node_sees_the_cluster_and_a_hold_anywhere_holds(tmp_path, sink, pg_url):
    sink.handler.data_reply = "451 4.3.0 try again later"  # mail waits in the queue
    async with two_relays(tmp_path, sink, pg_url, retry='["0.3s"]') as (a, b):
        await send_from(a, "from a")
        await send_from(b, "from b", rcpt="carol@example.net")
        for h in (a, b):  # either node's `relay queue list` shows both nodes' mail
            rows = await wait_rows(h, lambda rows: len(rows) == 2 and all(r["attempts"] >= 1 for r in rows))
            assert sorted(r["recipients"][0] for r in rows) == ["bob@example.net", "carol@example.net"]
        # b accepted carol's and retries it every 0.3 s; a's operator holds it
        target = next(r for r in rows if r["recipients"] == ["carol@example.net"])
        done = await q(a, "hold", target["id"])
        assert done.returncode == 0, done.stderr
        await wait_rows(b, lambda rows: any(r["id"] == target["id"] and r["held"] and not r["in_flight"]
                                            for r in rows))
        sink.handler.data_reply = None  # the provider is back
        await sink.wait_for(1, timeout=5)
        await asyncio.sleep(1.0)  # three retry periods: the held one stays
        assert len(sink.messages) == 1
        rows = await queue_rows(b)
        assert [r["id"] for r in rows] == [target["id"]] and rows[0]["held"]
        assert (await q(b, "release", target["id"])).returncode == 0
        await sink.wait_for(2, timeout=5)
        await asyncio.sleep(0.6)
        assert len(sink.messages) == 2


async def test_relay_status_lists_the_cluster_queue_and_its_nodes(tmp_path, sink, pg_url):
    sink.handler.data_reply = "451 4.3.0 try again later"
    async with two_relays(tmp_path, sink, pg_url, retry='["1h"]') as (a, b):
        await send_from(b, "waiting")
        await wait_rows(a, lambda rows: len(rows) == 1 and rows[0]["attempts"] == 1)
        result = await asyncio.to_thread(status_cli, a.config_path, "--json")
        assert result.returncode == 0, result.stderr
        queue = json.loads(result.stdout)["queue"]
        assert queue["messages"] == 1 and queue["url"] == pg_url
        assert [(n["node"], n["running"]) for n in queue["nodes"]] == [("node-a", True), ("node-b", True)]
        text = await asyncio.to_thread(status_cli, a.config_path)
        assert "1 message(s), 0 held" in text.stdout and "node-b" in text.stdout


async def cluster_folder(folder, sink_port: int, pg_url: str, node: str) -> tuple:
    """A relay folder for `relay serve` as its own process on the shared queue: (config,
    port, alice's key)."""
    folder.mkdir()
    port = free_port()
    config, secret = await prepare_relay_folder(folder, sink_port, port, '["0.3s"]')
    text = config.read_text().replace('path = "spool.db"', f'path = "spool.db"\nurl = "{pg_url}"')
    config.write_text(text + f'\n[cluster]\nnode = "{node}"\nlease = "5s"\n')
    return config, port, secret


async def test_a_relay_killed_mid_delivery_leaves_its_message_to_the_other_once(tmp_path, pg_url):
    held = asyncio.Event()  # never set: the first attempt waits for its 250 until its relay dies

    async def hold_the_first_reply() -> None:
        if sink.handler.attempts == 1:
            await held.wait()

    async with Sink() as sink:
        sink.handler.before_data_reply = hold_the_first_reply
        config_a, port_a, secret = await cluster_folder(tmp_path / "a", sink.port, pg_url, "node-a")
        config_b, port_b, _ = await cluster_folder(tmp_path / "b", sink.port, pg_url, "node-b")
        relay_a = await start_relay_process(config_a, port_a)
        relay_b = await start_relay_process(config_b, port_b)
        try:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port_a, start_tls=True,
                                     tls_context=client_tls(tmp_path / "a"), timeout=5)
            await client.connect()
            await client.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"],
                                  b"From: alice@example.com\r\nMessage-ID: <once@example.com>\r\n"
                                  b"Subject: once\r\n\r\nbody\r\n")
            await client.quit()
            await wait_until(lambda: sink.handler.attempts == 1, what="node a in DATA")
            relay_a.send_signal(signal.SIGKILL)  # mid-delivery: the provider has the data, no 250 yet
            await relay_a.wait()
            killed_at = time.monotonic()
            (message,) = await sink.wait_for(1, timeout=15)  # node b, once a's 5 s lease ended
            assert time.monotonic() - killed_at < 10
            assert "Message-ID: <once@example.com>" in message.text
            admin = await PostgresQueueStore.open(pg_url, relay=False)
            try:
                async def drained() -> bool:
                    return await admin.count() == 0

                await wait_until(drained, what="node b to record the delivery")
            finally:
                await admin.close()
            await asyncio.sleep(1.0)  # two follow periods of node b: nothing more arrives
            assert [m.text.count("<once@example.com>") for m in sink.messages] == [1]
            assert sink.handler.attempts == 2
        finally:
            relay_b.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay_b.wait(), 10) == 0
            if relay_a.returncode is None:
                relay_a.kill()
                await relay_a.wait()


# ------------------------------------------------------------ check-config


def with_queue_url(folder: Folder, url: str) -> None:
    folder.edit('path = "spool.db"', f'path = "spool.db"\nurl = "{url}"')


def test_check_config_names_an_unreachable_queue_database_without_its_password(tmp_path, postgres_server):
    folder = Folder(tmp_path)
    with_queue_url(folder, f"postgresql://relay:hunter2@127.0.0.1:{postgres_server.port}/no_such_db")
    problem = folder.only_problem()
    where = f"postgresql://relay:***@127.0.0.1:{postgres_server.port}/no_such_db"
    assert problem.startswith(f"[queue] url: {where}: cannot connect: ")
    assert "hunter2" not in folder.check().stderr


async def test_check_config_reads_the_shared_queues_schema_version(tmp_path, pg_url, postgres_server):
    folder = Folder(tmp_path)
    with_queue_url(folder, pg_url)
    fresh = await asyncio.to_thread(folder.check)
    assert fresh.returncode == 0 and fresh.warnings == [f"{folder.source}: [queue] url: {pg_url}: "
                                                        "queue schema version 0; the relay brings it to 1 "
                                                        "when it starts"]
    async with pg_store(pg_url, "n1"):
        pass
    current = await asyncio.to_thread(folder.check)
    assert current.returncode == 0 and current.warnings == []
    postgres_server.psql("UPDATE keyrelay_schema SET version = 7 WHERE component = 'queue'",
                         pg_url.rsplit("/", 1)[1])
    assert await asyncio.to_thread(folder.only_problem) == (
        f"[queue] url: {pg_url}: queue schema version 7 is newer than this program (1)")


async def test_the_queue_depth_gauge_counts_the_whole_clusters_queue(tmp_path, sink, pg_url):
    sink.handler.data_reply = "451 4.3.0 try again later"
    async with two_relays(tmp_path, sink, pg_url, retry='["1h"]', upstream_extra=metrics_table()) as (a, b):
        await send_from(b, "accepted by b")
        samples = await scrape_until(a, lambda s: value(s, "keyrelay_queue_messages") == 1,
                                     "node a's gauge to count node b's message")
        assert value(samples, "keyrelay_queue_held_messages") == 0
        assert value(samples, "keyrelay_queue_oldest_message_age_seconds") >= 0


async def test_a_full_disk_under_the_queue_database_answers_452_and_keeps_the_session(
        tmp_path, sink, pg_url, postgres_server):
    database = pg_url.rsplit("/", 1)[1]
    # in the server's own folder: the server's user must reach it (not so tmp_path, root's)
    with small_filesystem(postgres_server.folder / f"fs-{database}", "8m") as fs:
        if postgres_server.user == "postgres":  # the server runs as postgres (the suite is root)
            entry = pwd.getpwnam("postgres")
            os.chown(fs, entry.pw_uid, entry.pw_gid)
        postgres_server.psql(f"CREATE TABLESPACE {database} LOCATION '{fs}'")
        try:
            async with running_relay(tmp_path, sink, **cluster_parts(pg_url, "n1")) as h:
                postgres_server.psql(f"ALTER TABLE queue_body SET TABLESPACE {database}", database)
                await h.mailbox("alice@example.com")
                client = await h.login("alice@example.com", await h.key("alice@example.com"))
                filler = await asyncio.to_thread(fill, fs)
                with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                    await client.sendmail("alice@example.com", ["bob@example.net"], BODY)
                assert (refused.value.code, refused.value.message) == (
                    452, "4.3.1 Insufficient system storage, try again later")
                filler.unlink()
                await client.sendmail("alice@example.com", ["bob@example.net"], BODY)
                await client.quit()
                assert len(await sink.wait_for(1)) == 1
        finally:  # the mount goes: nothing of the database may stay on it
            with contextlib.suppress(AssertionError):
                postgres_server.psql("ALTER TABLE queue_body SET TABLESPACE pg_default", database)
            postgres_server.psql(f"DROP TABLESPACE IF EXISTS {database}")


async def test_both_nodes_reaching_for_the_same_due_messages_deliver_each_once(tmp_path, sink, pg_url):
    sink.handler.data_reply = "451 4.3.0 try again later"  # everything waits an hour
    async with two_relays(tmp_path, sink, pg_url, retry='["1h"]') as (a, b):
        for n in range(12):
            await send_from((a, b)[n % 2], f"message {n}")
        await wait_rows(a, lambda rows: len(rows) == 12 and all(r["attempts"] == 1 for r in rows), timeout=10)
        sink.handler.data_reply = None
        done = await q(b, "retry", "--all")  # due now on both nodes: they race for every one
        assert done.returncode == 0 and "12 message(s)" in done.stdout, (done.stdout, done.stderr)
        await sink.wait_for(12, timeout=10)

        async def drained() -> bool:
            return await a.relay.queue.store.count() == 0

        await wait_until(drained, what="the shared queue to drain")
        await asyncio.sleep(0.6)  # a follow period of each node: nothing is delivered again
        assert subjects(sink) == sorted(f"message {n}" for n in range(12))


async def test_a_claim_meeting_a_row_another_transaction_holds_looks_again_rather_than_drop_it(pg_url):
    """A node's own renew() (or an admin) may hold its message's row the instant the node
    claims it again after a failed read: the claim must say "shortly", not "gone", or
    the node drops the only timer of a message it owns."""
    async with pg_store(pg_url, "a") as a:
        message = item()
        await a.put(message, claimed_by=a.owner)
        async with await psycopg.AsyncConnection.connect(pg_url) as other:
            async with other.transaction():
                await other.execute("SELECT 1 FROM queue_message WHERE id = %s FOR UPDATE", (message.id,))
                now = time.time()
                answer = await a.claim(message.id, a.owner, now)
                assert isinstance(answer, NotDue) and now < answer.when <= now + 1
        assert isinstance(await a.claim(message.id, a.owner, time.time()), Delivery)
