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
