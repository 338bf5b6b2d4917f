"""First delivery to the configured upstream: success, temporary failure and retry,
permanent failure, an upstream that is down, and key routes."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import pytest

from relay.tlsconf import generate_self_signed
from tests.support.dsn import read_dsn
from tests.support.relayrun import write_secret
from tests.test_queue_cli import q

MESSAGE = b"From: alice@example.com\r\nSubject: hello\r\n\r\nhi\r\n"


def provider_tls(folder) -> ssl.SSLContext:
    """A provider's server TLS with a self-signed certificate (provider.pem, trusted by no one
    unless the relay's upstream names it as ca_file)."""
    generate_self_signed("provider.test", folder / "provider.pem", folder / "provider.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "provider.pem", folder / "provider.key")
    return context


async def send(h, *, rcpts=("bob@example.net",), route: str | None = None) -> None:
    """alice@example.com sends MESSAGE with a new key (routed to `route`, if given)."""
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com", route=route)
    client = await h.login("alice@example.com", secret)
    await client.sendmail("alice@example.com", list(rcpts), MESSAGE)
    await client.quit()


async def wait_spool_empty(h, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await h.relay.queue.store.count() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the spool did not drain")


async def test_temporary_failure_is_retried_until_accepted(h):
    h.sink.handler.data_reply = "451 4.3.0 try again later"
    await send(h)
    for _ in range(100):
        if h.sink.handler.attempts >= 2:
            break
        await asyncio.sleep(0.05)
    assert h.sink.handler.attempts >= 2  # retried after the 0.3 s backoff
    assert await h.relay.queue.store.count() == 1
    h.sink.handler.data_reply = None
    (message,) = await h.sink.wait_for(1)
    assert b"Subject: hello" in message.data
    await wait_spool_empty(h)


async def test_permanent_failure_bounces_to_the_sender_and_is_not_retried(h, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    h.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    await send(h, rcpts=("bob@example.net", "nobody@example.net"))
    message, bounce = await h.sink.wait_for(2)
    assert message.rcpt_tos == ["bob@example.net"]
    # the DSN goes to the mailbox, from the null sender, naming the recipient and the reply
    assert (bounce.mail_from, bounce.rcpt_tos) == ("<>", ["alice@example.com"])
    report = read_dsn(bounce.data)
    assert report.recipients == [{"final-recipient": "rfc822; nobody@example.net", "action": "failed",
                                  "status": "5.1.1", "diagnostic-code": "smtp; 550 5.1.1 no such user"}]
    assert "550 5.1.1 no such user" in report.text
    assert "Subject: hello" in report.headers  # the original headers come back
    await wait_spool_empty(h)
    bounced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bounced ")]
    assert len(bounced) == 1
    assert "to=<nobody@example.net>" in bounced[0] and "550 5.1.1 no such user" in bounced[0]


async def test_upstream_down_then_back(h):
    port = h.sink.port
    await h.sink.stop()
    await send(h)
    await asyncio.sleep(0.5)
    assert await h.relay.queue.store.count() == 1
    await h.sink.start_on(port)
    await h.sink.wait_for(1, timeout=5)
    await wait_spool_empty(h)


async def test_connections_to_the_upstream_are_reused(relay_with):
    async with relay_with(upstream_extra="max_connections = 4") as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        client = await h.login("alice@example.com", secret)
        for _ in range(20):
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        await h.sink.wait_for(20)
        assert h.sink.handler.connections <= 4  # at most the upstream's max_connections


@pytest.mark.parametrize("route", ["second", None])
async def test_key_route_picks_the_upstream(relay_with, route):
    from tests.support.sink import Sink

    async with Sink() as second:
        extra = f'\n[[upstream]]\nname = "second"\nhost = "127.0.0.1"\nport = {second.port}\ntls = "none"\n'
        async with relay_with(upstream_extra=extra) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route=route)
            client = await h.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            chosen, other = (second, h.sink) if route else (h.sink, second)
            await chosen.wait_for(1)
            await asyncio.sleep(0.2)
            assert other.messages == []


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
async def test_upstream_tls_modes_with_auth_to_the_provider(relay_with, tmp_path, mode):
    from tests.support.sink import Sink

    server_tls = provider_tls(tmp_path)
    write_secret(tmp_path / "provider-password", "s3cret\n")
    async with Sink(tls=server_tls, implicit=mode == "implicit", credentials=("relay", "s3cret")) as provider:
        extra = (f'\n[[upstream]]\nname = "provider"\nhost = "127.0.0.1"\nport = {provider.port}\n'
                 f'tls = "{mode}"\nca_file = "provider.pem"\nusername = "relay"\n'
                 'password_file = "provider-password"\n')
        async with relay_with(upstream_extra=extra) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="provider")
            client = await h.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            (message,) = await provider.wait_for(1)
            assert message.rcpt_tos == ["bob@example.net"]
            assert provider.logins == ["relay"]


async def test_failover_group_moves_to_the_next_provider_at_once(relay_with):
    from tests.support.procs import free_port
    from tests.support.sink import Sink

    down = free_port()  # nothing listens here
    async with Sink() as backup:
        extra = (f'\n[[upstream]]\nname = "primary"\nhost = "127.0.0.1"\nport = {down}\ntls = "none"\n'
                 f'\n[[upstream]]\nname = "backup"\nhost = "127.0.0.1"\nport = {backup.port}\ntls = "none"\n'
                 '\n[[group]]\nname = "main"\nmembers = ["primary", "backup"]\nstrategy = "failover"\n')
        async with relay_with(upstream_extra=extra, retry='["1h"]') as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="main")
            client = await h.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            await backup.wait_for(1, timeout=3)  # not an hour: within the same attempt
            await wait_spool_empty(h)


async def test_round_robin_group_spreads_messages_by_weight(relay_with):
    from tests.support.sink import Sink

    async with Sink() as a, Sink() as b:
        extra = (f'\n[[upstream]]\nname = "a"\nhost = "127.0.0.1"\nport = {a.port}\ntls = "none"\n'
                 f'\n[[upstream]]\nname = "b"\nhost = "127.0.0.1"\nport = {b.port}\ntls = "none"\n'
                 '\n[[group]]\nname = "spread"\nmembers = ["a", "b"]\nstrategy = "round_robin"\n'
                 'weights = [3, 1]\n')
        async with relay_with(upstream_extra=extra) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="spread")
            client = await h.login("alice@example.com", secret)
            for _ in range(8):
                await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            await wait_spool_empty(h)
            assert (len(a.messages), len(b.messages)) == (6, 2)


async def test_message_that_cannot_be_delivered_in_its_lifetime_bounces(relay_with):
    async with relay_with(queue='max_queue_lifetime = "1s"', retry='["0.3s"]') as h:
        h.sink.handler.rcpt_replies["bob@example.net"] = "451 4.3.0 busy, come back later"
        await send(h)
        await wait_spool_empty(h, timeout=5)  # ~1 s of retries, then the bounce is delivered
        (bounce,) = await h.sink.wait_for(1)
        assert bounce.rcpt_tos == ["alice@example.com"]
        report = read_dsn(bounce.data)
        assert "expired in queue" in report.text and "451 4.3.0 busy" in report.text
        (failed,) = report.recipients
        assert failed["status"] == "5.4.7"  # RFC 3463: delivery time expired


async def test_a_bounce_is_never_bounced(relay_with, caplog):
    caplog.set_level(logging.WARNING, logger="relay.queue")
    async with relay_with() as h:
        h.sink.handler.rcpt_replies["bob@example.net"] = "550 5.1.1 no such user"
        h.sink.handler.rcpt_replies["alice@example.com"] = "550 5.1.1 the sender is gone too"
        await send(h)
        await wait_spool_empty(h)
        await asyncio.sleep(0.3)
        assert h.sink.messages == []
        assert any("not bouncing a bounce" in r.getMessage() for r in caplog.records)


async def test_provider_certificate_is_verified_by_default(relay_with, tmp_path):
    from tests.support.sink import Sink

    server_tls = provider_tls(tmp_path)
    async with Sink(tls=server_tls) as provider:
        extra = (f'\n[[upstream]]\nname = "provider"\nhost = "127.0.0.1"\nport = {provider.port}\n'
                 'tls = "starttls"\n')  # no ca_file: a self-signed certificate is not trusted
        async with relay_with(upstream_extra=extra, retry='["1h"]') as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="provider")
            client = await h.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await client.quit()
            for _ in range(50):
                listed = json.loads((await q(h, "list", "--json")).stdout)
                if listed and listed[0]["last_error"]:
                    break
                await asyncio.sleep(0.1)
            assert provider.messages == []
            assert "certificate verify failed" in listed[0]["last_error"].lower()
