"""The shared queue (PostgreSQL) when the database fails under it (issue 12): what a
client was told 250 for is delivered, once; what it was told 451 for is delivered at most
as RFC 5321 section 6.1 allows; the relay carries on by itself once the database is back.

The faults are real: a TCP link between the relay and the real server that loses the
server's answer to a commit (tests/support/pgcut.py), and the server stopped or
restarted."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from relay.queue import SpoolBusy
from relay.queue.postgres import PostgresQueueStore
from tests.conftest import running_relay
from tests.support.pgcut import pg_cut
from tests.support.waiting import wait_until
from tests.test_queue_postgres import cluster_parts

MESSAGE = b"From: alice@example.com\r\nSubject: once\r\n\r\nhello\r\n"


async def drained(h) -> bool:
    return await h.relay.queue.store.count() == 0


async def test_a_commit_whose_answer_is_lost_is_still_250_and_delivered_once(tmp_path, sink, pg_url,
                                                                               postgres_server):
    async with pg_cut(postgres_server.port) as cut, \
            running_relay(tmp_path, sink, **cluster_parts(cut.url(pg_url), "n1")) as h:
        await h.mailbox("alice@example.com")
        client = await h.login("alice@example.com", await h.key("alice@example.com"))
        cut.marker = b"INSERT INTO queue_body"  # this message's commit lands; its answer does not
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        assert cut.cuts == 1
        await sink.wait_for(1)
        await wait_until(lambda: drained(h), what="the queue to drain")
        await asyncio.sleep(0.6)  # a follow period: nothing is delivered again
        assert [m.text.count("Subject: once") for m in sink.messages] == [1]


async def test_a_commit_answer_lost_with_the_database_is_451_and_delivered_once_it_is_back(
        tmp_path, sink, pg_url, postgres_server):
    async with pg_cut(postgres_server.port) as cut, \
            running_relay(tmp_path, sink, **cluster_parts(cut.url(pg_url), "n1")) as h:
        await h.mailbox("alice@example.com")
        client = await h.login("alice@example.com", await h.key("alice@example.com"))
        cut.marker, cut.down_after_cut = b"INSERT INTO queue_body", True
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        assert refused.value.code == 451
        assert cut.cuts == 1 and sink.messages == []
        cut.refuse = False  # the database is back: the message it had stored is not left behind
        await sink.wait_for(1, timeout=15)
        await wait_until(lambda: drained(h), what="the queue to drain")
        await asyncio.sleep(0.6)
        assert [m.text.count("Subject: once") for m in sink.messages] == [1]


async def test_a_second_relay_with_the_same_node_name_is_refused_after_the_node_lost_its_lock(
        tmp_path, sink, pg_url, postgres_server):
    """The node's lock lives on a connection of its own; the database restarting (or that
    connection broken) drops it. Then a second relay named alike would start and release
    the first one's claims as a dead run's: the running relay takes its lock again."""
    database = pg_url.rsplit("/", 1)[1]
    async with running_relay(tmp_path, sink, **cluster_parts(pg_url, "n1", lease="5s")):
        postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             f"WHERE datname = '{database}' AND application_name = 'keyrelay queue lock n1'")

        def locked_again() -> bool:
            return postgres_server.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                f"'{database}' AND application_name = 'keyrelay queue lock n1'") == "1"

        await wait_until(locked_again, timeout=5, what="node n1 to take its lock again")
        with pytest.raises(SpoolBusy, match="node = 'n1'"):
            await PostgresQueueStore.open(pg_url, relay=True, node="n1")
