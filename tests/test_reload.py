"""Reload in detail (the relay in-process; tests/test_service.py sends the real SIGHUP):
what a new config changes, for whom, and what it leaves alone."""

from __future__ import annotations

import asyncio
import logging

import aiosmtplib
import pytest

from relay.signing import generate_key
from tests.support.rawclient import RawSession
from tests.support.sink import Sink
from tests.support.waiting import wait_until

MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def edit(h, old: str, new: str) -> None:
    text = h.config_path.read_text()
    assert old in text, old
    h.config_path.write_text(text.replace(old, new, 1))


async def sender(h):
    await h.mailbox("alice@example.com")
    return await h.login("alice@example.com", await h.key("alice@example.com"))


async def test_a_new_upstream_takes_the_next_message_and_one_in_flight_finishes_once(relay_with, sink):
    async with Sink() as second, relay_with() as h:
        client = await sender(h)
        held = asyncio.Event()
        entered = asyncio.Event()

        async def hold():
            entered.set()
            await held.wait()

        sink.handler.before_data_reply = hold
        await client.sendmail("alice@example.com", ["first@example.net"], MESSAGE)
        await asyncio.wait_for(entered.wait(), 5)  # its delivery is at the old upstream's DATA

        edit(h, f"port = {sink.port}", f"port = {second.port}")
        assert await h.relay.reload()
        held.set()
        await sink.wait_for(1)

        await client.sendmail("alice@example.com", ["second@example.net"], MESSAGE)
        await second.wait_for(1)
        assert [m.rcpt_tos for m in sink.messages] == [["first@example.net"]]
        assert [m.rcpt_tos for m in second.messages] == [["second@example.net"]]
        # the old upstream's pooled connection is closed, not left open
        await wait_until(lambda: sink.handler.disconnections == sink.handler.connections,
                         what="the old upstream's connection closed")
        await client.quit()


async def test_limits_apply_to_open_sessions_at_their_next_command(relay_with):
    async with relay_with(server="max_recipients = 5") as h:
        client = await sender(h)
        await client.mail("alice@example.com")
        for n in range(3):
            await client.rcpt(f"r{n}@example.net")
        edit(h, "max_recipients = 5", "max_recipients = 3")
        assert await h.relay.reload()
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
            await client.rcpt("r3@example.net")
        assert refused.value.code == 452
        await client.quit()


async def test_a_smaller_message_size_is_advertised_to_new_sessions(relay_with):
    async with relay_with(server="max_message_size = 100000") as h:
        before = await h.client()
        edit(h, "max_message_size = 100000", "max_message_size = 5000")
        assert await h.relay.reload()
        after = await h.client()
        assert before.esmtp_extensions["size"] == "100000"  # an open session keeps its promise
        assert after.esmtp_extensions["size"] == "5000"
        await before.quit()
        await after.quit()


async def test_a_dkim_key_added_by_reload_signs_the_next_message(relay_with, sink, tmp_path):
    async with relay_with() as h:
        client = await sender(h)
        await client.sendmail("alice@example.com", ["a@example.net"], MESSAGE)
        generate_key("example.com", "s1", tmp_path / "dkim.key", "ed25519")
        h.config_path.write_text(h.config_path.read_text() + (
            '\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "dkim.key"\n'))
        assert await h.relay.reload()
        await client.sendmail("alice@example.com", ["b@example.net"], MESSAGE)
        await sink.wait_for(2)
        signed = {m.rcpt_tos[0]: b"DKIM-Signature:" in m.data for m in sink.messages}
        assert signed == {"a@example.net": False, "b@example.net": True}
        await client.quit()


async def test_restart_only_changes_are_named_and_the_rest_applies(relay_with, caplog):
    async with relay_with(server="max_recipients = 5") as h:
        port = h.port
        edit(h, 'submission = ["127.0.0.1:0"]', 'submission = ["127.0.0.1:1"]')
        edit(h, "max_recipients = 5", "max_recipients = 2")
        with caplog.at_level(logging.INFO, logger="relay"):
            assert await h.relay.reload()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("[server] submission / submissions (listeners) changed; that takes a restart" in w
                   for w in warnings), warnings
        assert h.port == port  # still listening where it was
        client = await sender(h)
        await client.mail("alice@example.com")
        await client.rcpt("a@example.net")
        await client.rcpt("b@example.net")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await client.rcpt("c@example.net")
        await client.quit()


async def test_a_world_readable_new_key_refuses_the_reload(relay_with, caplog):
    async with relay_with(server="max_recipients = 5") as h:
        edit(h, "max_recipients = 5", "max_recipients = 1")
        (h.folder / "key.pem").chmod(0o644)
        with caplog.at_level(logging.ERROR, logger="relay"):
            assert not await h.relay.reload()
        refusals = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
        assert len(refusals) == 1 and "[tls] key" in refusals[0]
        client = await sender(h)  # the old limits and certificate are in force
        await client.mail("alice@example.com")
        await client.rcpt("a@example.net")
        await client.rcpt("b@example.net")
        await client.quit()


async def test_reloads_in_a_row_leave_no_connection_behind(relay_with, sink):
    """Each reload retires the old couriers: their pooled connections are closed, and a
    delivery under way at the reload closes its connection when it is done."""
    async with relay_with() as h:
        client = await sender(h)
        for n in range(4):
            release, entered = asyncio.Event(), asyncio.Event()

            async def hold(release=release, entered=entered):
                entered.set()
                await release.wait()

            sink.handler.before_data_reply = hold if n % 2 else None
            await client.sendmail("alice@example.com", [f"r{n}@example.net"], MESSAGE)
            if n % 2:
                await asyncio.wait_for(entered.wait(), 5)  # the reload comes mid-delivery
            else:
                await sink.wait_for(n + 1)
            assert await h.relay.reload()
            release.set()
            await sink.wait_for(n + 1)
        assert sink.handler.connections == 4  # one per courier: each reload made new ones
        await wait_until(lambda: sink.handler.disconnections == 4,
                         what=f"retired connections closed ({sink.handler.disconnections} of 4)")
        await client.quit()


async def test_at_shutdown_a_message_in_flight_finishes_and_no_new_one_starts(relay_with, sink):
    """A pipelining client finishing its message during the shutdown grace has the MAIL
    it sent right behind the final dot refused with 421 4.3.2, not a new transaction."""
    async with relay_with() as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        session = await RawSession.logged_in(h.port, h.tls, "alice@example.com", secret)
        assert (await session.say(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await session.say(b"RCPT TO:<bob@example.net>")).startswith(b"250")
        assert (await session.say(b"DATA")).startswith(b"354")
        stopping = asyncio.get_running_loop().create_task(h.relay.stop(grace=5))
        await wait_until(lambda: not h.relay.listeners[0].server.is_serving(), what="the stop")
        session.writer.write(b"From: alice@example.com\r\n\r\nbody\r\n.\r\nMAIL FROM:<alice@example.com>\r\n")
        said = (await session.rest()).decode().splitlines()
        assert said[0].startswith("250 2.0.0 OK queued as")
        assert said[1:] == ["421 4.3.2 Service shutting down, try again later"]
        await asyncio.wait_for(stopping, 10)
        assert [m.rcpt_tos for m in sink.messages] == [["bob@example.net"]]


async def test_a_change_of_which_listeners_are_proxied_waits_for_a_restart(relay_with, caplog):
    """A listener starts expecting PROXY headers (or stops) only with a restart: a reload
    says so rather than keep silent about a setting it did not apply."""
    async with relay_with(server='proxy_from = ["127.0.0.1/32"]') as h:
        edit(h, 'proxy_from = ["127.0.0.1/32"]',
             'proxy_from = ["127.0.0.1/32"]\nproxy_listeners = ["127.0.0.1:0"]')
        with caplog.at_level(logging.INFO, logger="relay"):
            assert await h.relay.reload()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("[server] proxy_listeners changed; that takes a restart" in w for w in warnings), warnings
        client = await sender(h)  # no PROXY header expected yet: the session goes on as before
        await client.quit()
