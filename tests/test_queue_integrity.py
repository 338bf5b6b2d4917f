"""The queue never repeats a delivery and never loses a message or a bounce, whatever a
provider answers: bytes that are not UTF-8, refusals of the session rather than of a
recipient, a hang, a full disk under the spool, an admin acting mid-delivery."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from relay.queue import QueueItem, new_queue_id
from relay.queue.postgres import PostgresQueueStore
from relay.queue.sqlite import SqliteQueueStore
from tests.conftest import running_relay
from tests.support.dsn import read_dsn
from tests.support.fs import fill, small_filesystem
from tests.support.relayrun import write_secret
from tests.support.servers import RawServer
from tests.support.sink import Sink
from tests.support.waiting import wait_until
from tests.test_delivery import MESSAGE, provider_tls, send, wait_spool_empty
from tests.test_queue_cli import backend_fixture, q  # noqa: F401 - the `backend` fixture


async def queue_rows(h) -> list[dict]:
    listed = await q(h, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


async def wait_rows(h, check, timeout: float = 5.0) -> list[dict]:
    """`relay queue list --json` once `check(rows)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await queue_rows(h)
        if check(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the queue never got there: {rows}")
        await asyncio.sleep(0.1)


# ----------------------------------------------------------- what a provider says


async def test_non_utf8_refusal_gives_a_readable_bounce_and_one_copy_to_the_other(relay_with, backend):
    async with relay_with(retry='["0.2s"]', **backend) as h:
        h.sink.handler.rcpt_replies["nobody@example.net"] = b"550 5.1.1 unknown user caf\xe9\x1b[31m"
        await send(h, rcpts=("bob@example.net", "nobody@example.net"))
        await wait_spool_empty(h)  # decided for good: nothing is left to retry
        message, bounce = h.sink.messages
        assert message.rcpt_tos == ["bob@example.net"]
        report = read_dsn(bounce.data)
        (failed,) = report.recipients
        assert failed["final-recipient"] == "rfc822; nobody@example.net"
        assert failed["status"] == "5.1.1"
        # the bad byte became a replacement character, the escape sequence a space
        assert failed["diagnostic-code"] == "smtp; 550 5.1.1 unknown user caf? [31m"
        assert "550 5.1.1 unknown user caf\ufffd [31m" in report.text
        assert len(h.sink.messages) == 2


async def test_non_utf8_deferral_is_recorded_then_each_recipient_gets_one_copy(relay_with, backend):
    async with relay_with(retry='["0.2s"]', **backend) as h:
        h.sink.handler.rcpt_replies["carol@example.net"] = b"451 4.2.0 mailbox busy caf\xe9"
        await send(h, rcpts=("bob@example.net", "carol@example.net"))
        rows = await wait_rows(h, lambda rows: rows and rows[0]["attempts"] >= 2)
        assert rows[0]["recipients"] == ["carol@example.net"]
        assert rows[0]["last_error"].startswith("451 4.2.0 mailbox busy caf\ufffd")
        del h.sink.handler.rcpt_replies["carol@example.net"]
        await wait_spool_empty(h)
        assert [m.rcpt_tos for m in h.sink.messages] == [["bob@example.net"], ["carol@example.net"]]


# ------------------------------------------------------- refusals of the session


def provider_extra(port: int, name: str = "provider", tls: str = "starttls") -> str:
    return (f'\n[[upstream]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\ntls = "{tls}"\n'
            'ca_file = "provider.pem"\nusername = "relay"\npassword_file = "provider-password"\n')


async def test_provider_refusing_auth_keeps_the_mail_queued_until_fixed(relay_with, tmp_path):
    write_secret(tmp_path / "provider-password", "s3cret\n")
    async with Sink(tls=provider_tls(tmp_path), credentials=("relay", "changed")) as provider:
        async with relay_with(upstream_extra=provider_extra(provider.port), retry='["0.3s"]') as h:
            await send(h, route="provider")
            rows = await wait_rows(h, lambda rows: rows and rows[0]["attempts"] >= 2)
            assert len(rows) == 1 and rows[0]["sender"] == "alice@example.com"  # no bounce queued
            assert rows[0]["last_error"].startswith("451 4.4.0 provider refused AUTH: 535 5.7.8")
            provider.credentials = ("relay", "s3cret")  # the account is fixed
            (message,) = await provider.wait_for(1)
            assert message.rcpt_tos == ["bob@example.net"]
            await wait_spool_empty(h)
            assert h.sink.messages == [] and len(provider.messages) == 1


@pytest.mark.parametrize("refusal", ["greeting", "auth", "mail"])
async def test_failover_group_moves_on_when_a_provider_refuses_the_session(relay_with, tmp_path, refusal):
    write_secret(tmp_path / "provider-password", "s3cret\n")
    async with (Sink(tls=provider_tls(tmp_path), credentials=("relay", "s3cret")) as provider,
                RawServer(b"554 5.3.2 not accepting mail") as refusing, Sink() as backup):
        if refusal == "auth":
            provider.credentials = ("relay", "changed")
        elif refusal == "mail":
            provider.handler.mail_reply = "550 5.7.1 account suspended"
        port = refusing.port if refusal == "greeting" else provider.port
        extra = (provider_extra(port) +
                 f'\n[[upstream]]\nname = "backup"\nhost = "127.0.0.1"\nport = {backup.port}\ntls = "none"\n'
                 '\n[[group]]\nname = "main"\nmembers = ["provider", "backup"]\nstrategy = "failover"\n')
        async with relay_with(upstream_extra=extra, retry='["1h"]') as h:
            await send(h, route="main")
            (message,) = await backup.wait_for(1, timeout=3)  # the same attempt, not an hour later
            assert message.rcpt_tos == ["bob@example.net"]
            await wait_spool_empty(h)
            assert provider.messages == [] and h.sink.messages == []


async def test_a_bounce_through_a_refusing_provider_waits_and_says_who_refused(relay_with, tmp_path):
    write_secret(tmp_path / "provider-password", "s3cret\n")
    async with Sink(tls=provider_tls(tmp_path), credentials=("relay", "s3cret")) as provider:
        provider.handler.mail_reply = "550 5.7.1 account suspended"
        # a lifetime of 3 s: the bounce has one too, and each look below is a `relay queue list`
        # process, which on a loaded machine took longer than a 1 s bounce lived
        async with relay_with(upstream_extra=provider_extra(provider.port), retry='["0.3s"]',
                              queue='max_queue_lifetime = "3s"') as h:
            await send(h, route="provider")
            # the message expires; its bounce takes the same route, is refused too, and waits
            # (each look is a `relay queue list` process: generous bounds for a loaded machine)
            rows = await wait_rows(h, lambda rows: len(rows) == 1 and rows[0]["sender"] == ""
                                   and rows[0]["attempts"] >= 2, timeout=30)
            assert rows[0]["recipients"] == ["alice@example.com"]
            provider.handler.mail_reply = None
            (bounce,) = await provider.wait_for(1, timeout=30)
            assert bounce.rcpt_tos == ["alice@example.com"]
            (failed,) = read_dsn(bounce.data).recipients
            assert failed["status"] == "5.4.7"
            assert "provider refused MAIL FROM: 550 5.7.1 account suspended" in failed["diagnostic-code"]
            await wait_spool_empty(h)


# ------------------------------------------------------------------ isolation


async def test_a_hung_upstream_does_not_delay_mail_routed_elsewhere(relay_with):
    async with RawServer(None) as hung:
        extra = (f'\n[[upstream]]\nname = "hung"\nhost = "127.0.0.1"\nport = {hung.port}\ntls = "none"\n'
                 'timeout = "30s"\nmax_connections = 2\n')
        async with relay_with(upstream_extra=extra, retry='["1h"]') as h:
            await h.mailbox("alice@example.com")
            stuck_key = await h.key("alice@example.com", route="hung", name="stuck")
            client = await h.login("alice@example.com", stuck_key)
            for _ in range(20):
                await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            await wait_until(lambda: hung.connections == 2, what="the hung upstream's connections")
            healthy_key = await h.key("alice@example.com", name="healthy")  # the default route
            client = await h.login("alice@example.com", healthy_key)
            await client.sendmail("alice@example.com", ["carol@example.net"], MESSAGE)
            await client.quit()
            (message,) = await h.sink.wait_for(1, timeout=1.0)
            assert message.rcpt_tos == ["carol@example.net"]


# -------------------------------------------------------------------- full disk


async def test_disk_full_after_delivery_sends_once_and_records_when_space_returns(tmp_path, sink, caplog):
    caplog.set_level(logging.ERROR, logger="relay.queue")
    with small_filesystem(tmp_path / "spoolfs", "8m") as fs:
        filler = []

        async def fill_the_disk() -> None:  # the provider has the message; now the disk fills
            if not filler:
                filler.append(await asyncio.to_thread(fill, fs))

        sink.handler.before_data_reply = fill_the_disk
        async with running_relay(tmp_path, sink, spool="spoolfs/spool.db", retry='["0.2s"]') as h:
            await send(h)
            await sink.wait_for(1)

            def record_failures() -> int:
                return sum("cannot record the attempt" in r.getMessage() for r in caplog.records)

            await wait_until(lambda: record_failures() >= 3, what="three failed writes of the outcome")
            assert len(sink.messages) == 1 and sink.handler.attempts == 1  # never sent again
            filler[0].unlink()  # space returns
            await wait_spool_empty(h, timeout=10)
            assert len(sink.messages) == 1 and sink.handler.attempts == 1


async def test_full_spool_answers_452_and_keeps_the_session(tmp_path, sink):
    with small_filesystem(tmp_path / "spoolfs", "8m") as fs:
        async with running_relay(tmp_path, sink, spool="spoolfs/spool.db") as h:
            import aiosmtplib

            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com")
            client = await h.login("alice@example.com", secret)
            filler = await asyncio.to_thread(fill, fs)
            big = b"From: alice@example.com\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await client.sendmail("alice@example.com", ["bob@example.net"], big)
            assert (refused.value.code, refused.value.message) == (
                452, "4.3.1 Insufficient system storage, try again later")
            filler.unlink()
            await client.sendmail("alice@example.com", ["bob@example.net"], big)
            await client.quit()
            assert len(await h.sink.wait_for(1)) == 1


# --------------------------------------------------------- admins mid-delivery


@pytest.mark.parametrize("action", ["delete", "hold"])
async def test_delete_or_hold_during_delivery_says_so_and_is_not_retried(relay_with, action, backend):
    # the provider holds its reply while two `relay queue` processes run: on a loaded
    # machine that outlasts the usual 5 s upstream timeout
    async with relay_with(retry='["0.2s"]', upstream_timeout="30s", **backend) as h:
        gate = asyncio.Event()
        h.sink.handler.before_data_reply = gate.wait
        h.sink.handler.data_reply = "451 4.3.0 try again later"
        await send(h)
        await wait_until(lambda: h.sink.handler.attempts == 1, what="the relay in DATA")
        (row,) = await queue_rows(h)
        assert row["in_flight"] and row["next_attempt"] == "in flight"
        done = await q(h, action, row["id"])
        assert done.returncode == 0, done.stderr
        words = "removed" if action == "delete" else "on hold"
        assert done.stdout.strip() == f"{row['id']}: in flight; {words} after the current attempt"
        gate.set()
        if action == "delete":
            await wait_spool_empty(h)
        else:
            rows = await wait_rows(h, lambda rows: rows and not rows[0]["in_flight"])
            assert rows[0]["held"] and rows[0]["next_attempt"] == "held"
            await asyncio.sleep(0.6)  # three retry periods
        assert h.sink.handler.attempts == 1


async def test_admin_changes_racing_with_acceptance_never_deliver_twice(relay_with, backend, tmp_path):
    async with relay_with(**backend) as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        url = h.relay.config.queue.url
        if url is None:
            admin = await SqliteQueueStore.open(tmp_path / "spool.db", relay=False)
        else:
            admin = await PostgresQueueStore.open(url, relay=False)
        stop = asyncio.Event()

        async def retry_all_the_time() -> None:
            while not stop.is_set():
                await admin.retry_all()  # another process's commit: the relay reloads its schedule
                await asyncio.sleep(0)

        racer = asyncio.create_task(retry_all_the_time())
        try:
            client = await h.login("alice@example.com", secret)
            for n in range(150):
                await client.sendmail("alice@example.com", ["bob@example.net"],
                                      MESSAGE.replace(b"hello", f"message {n}".encode()))
            await client.quit()
            await h.sink.wait_for(150, timeout=20)
            await wait_spool_empty(h)
        finally:
            stop.set()
            await racer
            await admin.close()
        subjects = [m.text.split("Subject: ")[1].split("\r\n")[0] for m in h.sink.messages]
        assert len(subjects) == len(set(subjects)) == 150


# ------------------------------------------------------------------ poison


async def test_a_message_that_keeps_raising_is_held_and_not_retried(relay_with, backend, caplog):
    async with relay_with(**backend) as h:
        caplog.set_level(logging.ERROR, logger="relay.queue")
        h.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
        # a sender no DSN can be addressed to (a spool written by something else): building
        # the bounce raises every time
        item = QueueItem(id=new_queue_id(), created=time.time(), mail_from="alice@example.com\r\nBcc: x",
                         recipients=["bob@example.net", "nobody@example.net"], key_id="k", mailbox="a",
                         route=None, body=MESSAGE)
        await h.relay.queue.put(item)
        rows = await wait_rows(h, lambda rows: rows and rows[0]["held"])
        assert rows[0]["last_error"].startswith("on hold after 3 unexpected errors")
        assert any(r.levelno == logging.ERROR and "put on hold" in r.getMessage() for r in caplog.records)
        (delivered,) = h.sink.messages  # bob once; the failed recipient is never tried again
        assert delivered.rcpt_tos == ["bob@example.net"] and h.sink.handler.attempts == 1
        await asyncio.sleep(0.9)  # three retry periods: held means held
        assert (await queue_rows(h))[0]["attempts"] == 3


# ------------------------------------------------------------- the spool file


async def test_a_second_relay_on_the_same_spool_is_refused(h):
    from relay.app import Relay
    from relay.queue import SpoolBusy

    second = Relay(h.relay.config)
    with pytest.raises(SpoolBusy, match="another relay is running on this spool"):
        await second.start()
    await second.stop(grace=0.1)
    assert (await queue_rows(h)) == []  # admin commands still work beside the relay


async def test_a_pooled_connection_the_provider_closed_with_421_is_replaced_at_once(relay_with):
    async with relay_with(retry='["1h"]') as h:
        await send(h)  # leaves a pooled connection to the provider
        await h.sink.wait_for(1)
        h.sink.handler.mail_reply_once = "421 4.3.2 closing idle connection"
        client = await h.login("alice@example.com", await h.key("alice@example.com", name="second"))
        await client.sendmail("alice@example.com", ["carol@example.net"], MESSAGE)
        await client.quit()
        second = (await h.sink.wait_for(2, timeout=3))[1]  # not an hour later
        assert second.rcpt_tos == ["carol@example.net"]


async def test_a_swallowed_cancellation_does_not_hang_the_queues_stop(relay_with):
    """On Python 3.11 asyncio.wait_for can swallow a cancellation that arrives as the
    awaited call finishes (a lease renewal's look at its lock connection did): the renew
    loop then went on, and the relay's stop waited for it forever (a CI run hung 13 min).
    The queue's loops end at stop whatever their awaits did with the cancellation."""
    async with relay_with(upstream_extra='\n[cluster]\nlease = "5s"\n') as h:
        queue = h.relay.queue
        called = asyncio.Event()

        async def renew_that_swallows(owner: str) -> None:
            called.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return  # what wait_for did: the cancellation is gone

        queue.store.renew = renew_that_swallows
        await asyncio.wait_for(called.wait(), 10)  # every lease/3
        async with asyncio.timeout(10):
            await queue.stop()
