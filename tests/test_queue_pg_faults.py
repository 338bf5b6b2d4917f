"""The shared queue (PostgreSQL) when the database fails under it (issue 12): what a
client was told 250 for is delivered, once; what it was told 451 for is delivered at most
as RFC 5321 section 6.1 allows; the relay carries on by itself once the database is back.

The faults are real: a TCP link between the relay and the real server that loses the
server's answer to a commit (tests/support/pgcut.py), and the server stopped or
restarted."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import time

import aiosmtplib
import pytest

from relay.queue import SpoolBusy, SpoolError
from relay.queue.postgres import PostgresQueueStore
from tests.conftest import running_relay
from tests.support.pgcut import pg_cut
from tests.support.postgres import Postgres, running_postgres
from tests.support.waiting import wait_until
from tests.test_queue_postgres import cluster_parts

MESSAGE = b"From: alice@example.com\r\nSubject: once\r\n\r\nhello\r\n"


@pytest.fixture
def own_postgres():
    """A server of this test's own, to stop and start (the worker's is shared), durable:
    what it answered COMMIT for survives its crash, as in production."""
    with running_postgres(durable=True) as server:
        yield server


def pg_ctl(server: Postgres, *args: str) -> None:
    command = [str(server.bin / "pg_ctl"), "-D", str(server.folder / "data"), "-w", *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", server.user, "--", *command]
    subprocess.run(command, capture_output=True, timeout=60, check=True)


def crash(server: Postgres) -> str:
    """Stop the server at once, as a crash would; the options to start it again with."""
    words = shlex.split((server.folder / "data" / "postmaster.opts").read_text())
    options = shlex.join(words[3:])  # past the program and its -D folder
    pg_ctl(server, "-m", "immediate", "stop")
    return options


def start(server: Postgres, options: str) -> None:
    pg_ctl(server, "-l", str(server.folder / "server.log"), "-o", options, "start")


async def drained(h) -> bool:
    try:
        return await h.relay.queue.store.count() == 0
    except SpoolError:  # the database is still coming back
        return False


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



async def test_after_a_long_database_outage_mail_is_accepted_again_within_seconds(
        tmp_path, sink, own_postgres):
    """psycopg's pool doubles its wait between connection attempts (1, 2, 4, 8, 16 s...):
    unbounded, a relay came back as long after the database as the database had been
    away, answering 451 to everyone meanwhile."""
    url = own_postgres.create_database("q")
    async with running_relay(tmp_path, sink, **cluster_parts(url, "n1")) as h:
        await h.mailbox("alice@example.com")
        key = await h.key("alice@example.com")
        options = await asyncio.to_thread(crash, own_postgres)
        down_until = time.monotonic() + 17
        await wait_until(lambda: time.monotonic() > down_until, timeout=20, what="the outage to last")
        await asyncio.to_thread(start, own_postgres, options)
        back = time.monotonic()

        async def accepted() -> bool:
            client = await h.login("alice@example.com", key)
            try:
                await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
                return True
            except aiosmtplib.SMTPDataError as exc:
                assert exc.code == 451
                return False
            except aiosmtplib.SMTPReadTimeoutError:  # the relay still waits for a connection
                return False
            finally:
                client.close()

        await wait_until(accepted, timeout=30, what="a message accepted again")
        assert time.monotonic() - back < 5
        await sink.wait_for(1)
