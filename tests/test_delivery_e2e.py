"""Through the whole relay: DKIM signatures applied at acceptance, and direct MX delivery
resolved against a real DNS server on loopback."""

from __future__ import annotations

import asyncio

import pytest

from relay.signing import generate_key
from tests.support.dns import DnsServer
from tests.test_dkim import verify

MESSAGE = b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: signed\r\n\r\nhello\r\n"


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_accepted_mail_is_dkim_signed_and_verifies(relay_with, tmp_path, algorithm):
    record = generate_key("example.com", "s1", tmp_path / "dkim.key", algorithm)
    extra = '\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "dkim.key"\n'
    async with relay_with(upstream_extra=extra) as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        client = await h.login("alice@example.com", secret)
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        (message,) = await h.sink.wait_for(1)
    assert b"DKIM-Signature:" in message.data
    # the Date and Message-ID the relay added are covered by the signature
    assert await verify(message.data, [record])
    tampered = message.data.replace(b"hello", b"HELLO")
    assert not await verify(tampered, [record])


async def test_retries_send_the_same_signed_bytes(relay_with, tmp_path):
    generate_key("example.com", "s1", tmp_path / "dkim.key", "ed25519")
    extra = '\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "dkim.key"\n'
    async with relay_with(upstream_extra=extra, retry='["0.2s"]') as h:
        h.sink.handler.rcpt_replies["bob@example.net"] = "451 4.2.0 busy"
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        client = await h.login("alice@example.com", secret)
        await client.sendmail("alice@example.com", ["bob@example.net", "carol@example.net"], MESSAGE)
        await client.quit()
        first = (await h.sink.wait_for(1))[0]
        await asyncio.sleep(0.3)
        del h.sink.handler.rcpt_replies["bob@example.net"]
        second = (await h.sink.wait_for(2))[1]
    assert (first.rcpt_tos, second.rcpt_tos) == (["carol@example.net"], ["bob@example.net"])
    assert first.data == second.data


async def test_mx_route_delivers_to_each_domains_mail_exchanger(relay_with, tmp_path):
    from tests.support.sink import Sink

    async with Sink() as mx_sink:
        zone = {
            ("example.net.", "MX"): ["10 mx.example.net."],
            ("mx.example.net.", "A"): ["127.0.0.1"],
            ("nullmx.example.", "MX"): ["0 ."],
        }
        async with DnsServer(zone) as dns_server:
            extra = (f'\n[[upstream]]\nname = "direct"\nkind = "mx"\nport = {mx_sink.port}\ntimeout = "5s"\n'
                     'allow_private_targets = true\n'
                     f'\n[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_server.port}\ntimeout = "2s"\n')
            async with relay_with(upstream_extra=extra) as h:
                await h.mailbox("alice@example.com")
                secret = await h.key("alice@example.com", route="direct")
                client = await h.login("alice@example.com", secret)
                await client.sendmail("alice@example.com", ["bob@example.net", "eve@nullmx.example"],
                                      MESSAGE)
                await client.quit()
                # bob's mail to the MX host; eve's domain refuses all mail, so a bounce
                # (routed like the original: via MX to example.com, which has no DNS: the
                # bounce itself fails, and a bounce is never bounced)
                (delivered,) = await mx_sink.wait_for(1)
                assert delivered.rcpt_tos == ["bob@example.net"]
                assert ("example.net.", "MX") in dns_server.queries
                assert ("nullmx.example.", "MX") in dns_server.queries
