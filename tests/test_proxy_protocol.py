"""PROXY protocol v2 on a listener behind a TCP load balancer (issue 12): the header's
source address is the client's for the log, allow-from, the key's last-used address and
the Received: header; anyone not in proxy_from, or without a valid header, gets no
greeting. The relay's other STARTTLS listener is unchanged."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import struct

import pytest

from relay.config import cross_check, parse_config
from tests.conftest import running_relay
from tests.support.rawclient import RawSession
from tests.support.relayrun import Harness, write_config
from tests.test_key_networks import NOT_ALLOWED, cli, cli_key

PROXIED = "127.0.0.3:0"  # the listener behind the "load balancer"
CLIENT = "203.0.113.7"  # the address the load balancer forwards
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(source: str, source_port: int, destination: str = "127.0.0.3", port: int = 587) -> bytes:
    """A PROXY protocol v2 header (haproxy's proxy-protocol.txt, section 2.2): version 2,
    command PROXY, TCP over IPv4, then the addresses and ports."""
    addresses = struct.pack("!4s4sHH", socket.inet_aton(source), socket.inet_aton(destination),
                            source_port, port)
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(addresses)) + addresses


def behind_balancer(folder, sink, proxy_from: str = "127.0.0.1/32", server: str = ""):
    """The relay with a second STARTTLS listener, on 127.0.0.3, behind a load balancer."""
    return running_relay(folder, sink, server=server, edit=lambda text: text.replace(
        'submission = ["127.0.0.1:0"]',
        f'submission = ["127.0.0.1:0", "{PROXIED}"]\n'
        f'proxy_listeners = ["{PROXIED}"]\nproxy_from = ["{proxy_from}"]'))


def proxied_port(h: Harness) -> int:
    return next(listener.port for listener in h.relay.listeners
                if listener.kind == "submission" and listener.host == "127.0.0.3")


async def through_balancer(h: Harness, header: bytes) -> RawSession:
    """Connected from 127.0.0.1 (the balancer) to the proxied listener, header sent."""
    reader, writer = await asyncio.open_connection("127.0.0.3", proxied_port(h), local_addr=("127.0.0.1", 0))
    writer.write(header)
    return RawSession(reader, writer)


async def auth_plain(session: RawSession, h: Harness, username: str, secret: str) -> bytes:
    assert (await session.reply()).startswith(b"220 ")
    await session.say(b"EHLO client.test")
    assert (await session.say(b"STARTTLS")).startswith(b"220")
    await session.writer.start_tls(h.tls, server_hostname="relay.test")
    await session.say(b"EHLO client.test")
    plain = base64.b64encode(b"\0" + username.encode() + b"\0" + secret.encode())
    return (await session.say(b"AUTH PLAIN " + plain)).rstrip()


def mail_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay.mail"]


async def test_the_forwarded_address_is_the_client(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer(tmp_path, sink) as h:
        await h.mailbox("alice@example.com")
        key_id, secret = await cli_key(h, "alice@example.com", "203.0.113.0/24")
        _, local_only = await cli_key(h, "alice@example.com", "127.0.0.1/32")

        session = await through_balancer(h, proxy_v2(CLIENT, 40000))
        reply = await auth_plain(session, h, "alice@example.com", secret)
        assert reply == b"235 2.7.0 Authentication successful"
        assert (await session.say(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await session.say(b"RCPT TO:<bob@example.net>")).startswith(b"250")
        assert (await session.say(b"DATA")).startswith(b"354")
        reply = await session.say(b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n.")
        assert reply.startswith(b"250"), reply
        session.close()
        delivered = await h.sink.wait_for(1)
        assert f"([{CLIENT}])".encode() in delivered[0].data.split(b"\r\n\r\n")[0]

        refused = await through_balancer(h, proxy_v2(CLIENT, 40001))
        reply = await auth_plain(refused, h, "alice@example.com", local_only)
        assert reply.decode() == f"535 {NOT_ALLOWED}"
        refused.close()

        await h.relay.store.flush_uses()  # last-used is written in batches
        shown = json.loads((await cli(h, "key", "show", key_id, "--json")).stdout)
        assert shown["last_ip"] == CLIENT
        lines = mail_lines(caplog)
        assert any(line.startswith("connect ") and f"client={CLIENT} " in line for line in lines), lines
        assert any(line.startswith("auth_ok ") and f"client={CLIENT} " in line for line in lines), lines
        assert not any("client=127.0.0.1" in line for line in lines), lines

        # the other listener takes no header: the connection's own address is the client
        direct = await h.client(source="127.0.0.1")
        try:
            await direct.login("alice@example.com", local_only)
        finally:
            direct.close()


async def closed_without_greeting(session: RawSession) -> None:
    try:
        assert await session.rest() == b""  # the relay wrote nothing and closed
    finally:
        session.close()


async def test_no_header_or_a_bad_one_gets_no_greeting(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer(tmp_path, sink) as h:
        await closed_without_greeting(await through_balancer(h, b"EHLO client.test\r\n"))
        v1 = f"PROXY TCP4 {CLIENT} 127.0.0.3 40000 587\r\n".encode()
        await closed_without_greeting(await through_balancer(h, v1))  # v2 only
        local = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)  # LOCAL: no client named
        await closed_without_greeting(await through_balancer(h, local))
        lines = [line for line in mail_lines(caplog) if line.startswith("refused ")]
        assert len(lines) == 3 and all("reason=proxy_header" in line for line in lines), lines
        assert not any(line.startswith("connect ") for line in mail_lines(caplog))


async def test_a_connection_not_from_a_balancer_gets_no_greeting(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer(tmp_path, sink, proxy_from="127.0.0.2/32") as h:
        await closed_without_greeting(await through_balancer(h, proxy_v2(CLIENT, 40000)))
        assert any(line.startswith("refused client=127.0.0.1 ") and "reason=not_a_proxy" in line
                   for line in mail_lines(caplog)), mail_lines(caplog)


async def test_the_per_address_cap_counts_the_forwarded_client(tmp_path, sink):
    """Two clients behind one balancer, max 1 connection per address: the second client
    still gets in (the balancer's own address is not what is counted), the first one's
    second connection gets the per-address 421."""
    async with behind_balancer(tmp_path, sink, server="max_connections_per_address = 1") as h:
        first = await through_balancer(h, proxy_v2(CLIENT, 40000))
        assert (await first.reply()).startswith(b"220 ")
        other = await through_balancer(h, proxy_v2("198.51.100.9", 40000))
        assert (await other.reply()).startswith(b"220 ")
        again = await through_balancer(h, proxy_v2(CLIENT, 40001))
        assert (await again.rest()).startswith(b"421 4.7.0")
        for session in (first, other, again):
            session.close()


@pytest.mark.parametrize(("extra", "problem"), [
    ('proxy_listeners = ["127.0.0.9:587"]\nproxy_from = ["10.0.0.0/8"]',
     "proxy_listeners: '127.0.0.9:587' is not one of [server] submission"),
    ('proxy_listeners = ["127.0.0.1:0"]', "proxy_from: required with proxy_listeners"),
    ('proxy_listeners = ["127.0.0.5:465"]\nproxy_from = ["10.0.0.0/8"]',
     "proxy_listeners: '127.0.0.5:465' is a submissions (implicit TLS) listener"),
    ('proxy_listeners = ["127.0.0.1:0"]\nproxy_from = ["10.0.0.1/8"]',
     "proxy_from: '10.0.0.1/8' is not a network in CIDR notation"),
])
def test_check_config_refuses_a_proxy_setting_that_cannot_work(tmp_path, extra, problem):
    path = write_config(tmp_path, 2525, server=extra)
    text = path.read_text().replace('submissions = ["127.0.0.1:0"]', 'submissions = ["127.0.0.5:465"]')
    path.write_text(text)
    problems = cross_check(parse_config(path))
    assert any(f"[server] {problem}" in line for line in problems), problems
