"""PROXY protocol v2 on a listener behind a TCP load balancer (issue 12): the header's
source address is the client's for the log, allow-from, the key's last-used address and
the Received: header; anyone not in proxy_from, or without a valid header, gets no
greeting. The relay's other STARTTLS listener is unchanged."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
import struct

import pytest

from relay.config import cross_check, parse_config
from relay.smtpd import proxytls
from tests.conftest import running_relay
from tests.support.rawclient import RawSession
from tests.support.relayrun import Harness, write_config
from tests.support.waiting import wait_until
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
     "proxy_listeners: '127.0.0.9:587' is not one of [server] submission or submissions"),
    ('proxy_listeners = ["127.0.0.1:0"]', "proxy_from: required with proxy_listeners"),
    ('proxy_listeners = ["127.0.0.1:0"]\nproxy_from = ["10.0.0.1/8"]',
     "proxy_from: '10.0.0.1/8' is not a network in CIDR notation"),
])
def test_check_config_refuses_a_proxy_setting_that_cannot_work(tmp_path, extra, problem):
    path = write_config(tmp_path, 2525, server=extra)
    text = path.read_text().replace('submissions = ["127.0.0.1:0"]', 'submissions = ["127.0.0.5:465"]')
    path.write_text(text)
    problems = cross_check(parse_config(path))
    assert any(f"[server] {problem}" in line for line in problems), problems


def test_check_config_takes_an_implicit_tls_listener_behind_a_balancer(tmp_path):
    extra = 'proxy_listeners = ["127.0.0.5:465"]\nproxy_from = ["10.0.0.0/8"]'
    path = write_config(tmp_path, 2525, server=extra)
    text = path.read_text().replace('submissions = ["127.0.0.1:0"]', 'submissions = ["127.0.0.5:465"]')
    path.write_text(text)
    assert not [line for line in cross_check(parse_config(path)) if "proxy" in line]


# ---------------------------------------------------------------- implicit TLS (465)

PROXIED_465 = "127.0.0.4:0"  # the implicit-TLS listener behind the "load balancer"


def behind_balancer_465(folder, sink, proxy_from: str = "127.0.0.1/32", server: str = ""):
    """The relay with a second implicit-TLS listener, on 127.0.0.4, behind a load balancer."""
    return running_relay(folder, sink, server=server, edit=lambda text: text.replace(
        'submissions = ["127.0.0.1:0"]',
        f'submissions = ["127.0.0.1:0", "{PROXIED_465}"]\n'
        f'proxy_listeners = ["{PROXIED_465}"]\nproxy_from = ["{proxy_from}"]'))


def proxied_465_port(h: Harness) -> int:
    return next(listener.port for listener in h.relay.listeners
                if listener.kind == "submissions" and listener.host == "127.0.0.4")


async def to_balanced_465(h: Harness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from 127.0.0.1 (the balancer) to the proxied implicit-TLS listener."""
    return await asyncio.open_connection("127.0.0.4", proxied_465_port(h), local_addr=("127.0.0.1", 0))


async def tls_through_balancer(h: Harness, header: bytes) -> RawSession:
    """The header in one write, then the TLS handshake (the balancer forwarding a client)."""
    reader, writer = await to_balanced_465(h)
    writer.write(header)
    await writer.drain()
    await writer.start_tls(h.tls, server_hostname="relay.test")
    return RawSession(reader, writer)


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first bytes a TLS client sends (its ClientHello), for a write that begins with them."""
    return MemoryTLS(asyncio.StreamReader(), None, context).client_hello()  # type: ignore[arg-type]


class MemoryTLS:
    """A TLS client on memory buffers, so that the test decides what each TCP write holds:
    here the PROXY header and the ClientHello together, as a balancer may forward them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="relay.test")
        self.text = b""

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    async def _receive(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), 5)
        if not data:
            raise ConnectionError("the relay closed the connection")
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.writer.write(self.outgoing.read())
                await self._receive()
        self.writer.write(self.outgoing.read())

    async def reply(self) -> bytes:
        """The last line of the next reply."""
        while True:
            while b"\n" not in self.text:
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.text += self.tls.read(65536)
                    continue
                await self._receive()
            line, _, self.text = self.text.partition(b"\n")
            if line[3:4] != b"-":
                return line + b"\n"

    async def say(self, line: bytes) -> bytes:
        self.tls.write(line + b"\r\n")
        self.writer.write(self.outgoing.read())
        return await self.reply()


async def test_implicit_tls_the_forwarded_address_is_the_client(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink) as h:
        await h.mailbox("alice@example.com")
        key_id, secret = await cli_key(h, "alice@example.com", "203.0.113.0/24")
        _, local_only = await cli_key(h, "alice@example.com", "127.0.0.1/32")

        session = await tls_through_balancer(h, proxy_v2(CLIENT, 40000, "127.0.0.4", 465))
        assert (await session.reply()).startswith(b"220 ")
        await session.say(b"EHLO client.test")
        plain = base64.b64encode(b"\0alice@example.com\0" + secret.encode())
        assert (await session.say(b"AUTH PLAIN " + plain)).rstrip() == b"235 2.7.0 Authentication successful"
        assert (await session.say(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
        assert (await session.say(b"RCPT TO:<bob@example.net>")).startswith(b"250")
        assert (await session.say(b"DATA")).startswith(b"354")
        reply = await session.say(b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n.")
        assert reply.startswith(b"250"), reply
        session.close()
        delivered = await h.sink.wait_for(1)
        assert f"([{CLIENT}])".encode() in delivered[0].data.split(b"\r\n\r\n")[0]

        refused = await tls_through_balancer(h, proxy_v2(CLIENT, 40001, "127.0.0.4", 465))
        assert (await refused.reply()).startswith(b"220 ")
        await refused.say(b"EHLO client.test")
        plain = base64.b64encode(b"\0alice@example.com\0" + local_only.encode())
        assert (await refused.say(b"AUTH PLAIN " + plain)).rstrip().decode() == f"535 {NOT_ALLOWED}"
        refused.close()

        await h.relay.store.flush_uses()  # last-used is written in batches
        shown = json.loads((await cli(h, "key", "show", key_id, "--json")).stdout)
        assert shown["last_ip"] == CLIENT
        lines = mail_lines(caplog)
        assert any(line.startswith("connect ") and f"client={CLIENT} " in line
                   and "listener=submissions" in line for line in lines), lines
        assert any(line.startswith("auth_ok ") and f"client={CLIENT} " in line for line in lines), lines
        assert not any("client=127.0.0.1" in line for line in lines), lines

        # the relay's other implicit-TLS listener takes no header, as before
        direct = await h.client(implicit=True, source="127.0.0.1")
        try:
            await direct.login("alice@example.com", local_only)
        finally:
            direct.close()


async def test_implicit_tls_header_and_client_hello_in_one_write(tmp_path, sink, caplog):
    """The bytes read past the header (the start of the handshake) go to TLS."""
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink) as h:
        reader, writer = await to_balanced_465(h)
        try:
            tls = MemoryTLS(reader, writer, h.tls)
            writer.write(proxy_v2(CLIENT, 40000, "127.0.0.4", 465) + tls.client_hello())
            await tls.handshake()
            assert (await tls.reply()).startswith(b"220 relay.test")
            assert (await tls.say(b"EHLO client.test")).startswith(b"250 ")
        finally:
            writer.close()
        assert any(line.startswith("connect ") and f"client={CLIENT} " in line
                   for line in mail_lines(caplog)), mail_lines(caplog)


async def closed_without_tls(h: Harness, first_write: bytes) -> None:
    """The relay closes the connection and writes nothing: no ServerHello, no alert (a
    close with the client's bytes unread is a reset, which says the same)."""
    reader, writer = await to_balanced_465(h)
    writer.write(first_write)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()


async def test_implicit_tls_a_connection_not_from_a_balancer_gets_no_tls(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink, proxy_from="127.0.0.2/32") as h:
        hello = client_hello(h.tls)
        await closed_without_tls(h, proxy_v2(CLIENT, 40000, "127.0.0.4", 465) + hello)
        lines = mail_lines(caplog)
        assert any(line.startswith("refused client=127.0.0.1 ") and "listener=submissions" in line
                   and "reason=not_a_proxy" in line for line in lines), lines
        assert not any(line.startswith(("connect ", "tls_failed ")) for line in lines), lines
        refused = h.relay.metrics.registry.get_sample_value("keyrelay_connections_refused_total",
                                                            {"reason": "not_a_proxy"})
        assert refused == 1


async def test_implicit_tls_no_header_or_a_bad_one_gets_no_tls(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink) as h:
        hello = client_hello(h.tls)
        await closed_without_tls(h, hello)  # a client straight to the listener: no header
        await closed_without_tls(h, b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n")
        await closed_without_tls(h, f"PROXY TCP4 {CLIENT} 127.0.0.4 40000 465\r\n".encode() + hello)
        await closed_without_tls(h, V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0) + hello)  # LOCAL
        too_long = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 65535)  # a 64 KiB "header"
        await closed_without_tls(h, too_long + b"\0" * 8192)
        lines = [line for line in mail_lines(caplog) if line.startswith("refused ")]
        assert len(lines) == 5, lines
        assert all("reason=proxy_header" in line and "listener=submissions" in line for line in lines), lines
        assert not any(line.startswith(("connect ", "tls_failed ")) for line in mail_lines(caplog))


async def test_implicit_tls_the_per_address_cap_counts_the_forwarded_client(tmp_path, sink, caplog):
    """As on 587: one balancer, max 1 connection per address; the second client gets in,
    the first one's second connection gets the per-address 421 (inside TLS)."""
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink, server="max_connections_per_address = 1") as h:
        first = await tls_through_balancer(h, proxy_v2(CLIENT, 40000, "127.0.0.4", 465))
        assert (await first.reply()).startswith(b"220 ")
        other = await tls_through_balancer(h, proxy_v2("198.51.100.9", 40000, "127.0.0.4", 465))
        assert (await other.reply()).startswith(b"220 ")
        again = await tls_through_balancer(h, proxy_v2(CLIENT, 40001, "127.0.0.4", 465))
        assert (await again.rest()).startswith(b"421 4.7.0")
        for session in (first, other, again):
            session.close()
        assert any(line.startswith(f"refused client={CLIENT} ") and "reason=per_address" in line
                   for line in mail_lines(caplog)), mail_lines(caplog)


async def test_implicit_tls_a_header_that_never_ends_is_closed_in_time(tmp_path, sink, caplog, monkeypatch):
    """A balancer (or anyone in proxy_from) that sends half a header holds its slot for the
    header's timeout (shortened here from 10 s), then is closed with no TLS."""
    monkeypatch.setattr(proxytls, "PROXY_HEADER_TIMEOUT", 0.5)
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink) as h:
        reader, writer = await to_balanced_465(h)
        writer.write(proxy_v2(CLIENT, 40000, "127.0.0.4", 465)[:20])
        await wait_until(lambda: h.relay.registry.count == 1, what="the slot taken at accept")
        started = asyncio.get_running_loop().time()
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        finally:
            writer.close()
        assert asyncio.get_running_loop().time() - started < 3
        await wait_until(lambda: h.relay.registry.count == 0, what="the slot given back")
        lines = [line for line in mail_lines(caplog) if line.startswith("refused ")]
        assert len(lines) == 1, lines
        assert "client=127.0.0.1 " in lines[0] and "reason=proxy_header" in lines[0], lines


async def test_implicit_tls_over_max_connections_the_421_comes_inside_tls(tmp_path, sink, caplog):
    """max_connections counts at accept, through the balancer too; the connection over it
    still has its header read (it precedes the handshake) and gets the 421 inside TLS."""
    caplog.set_level(logging.INFO, logger="relay.mail")
    async with behind_balancer_465(tmp_path, sink, server="max_connections = 1") as h:
        first = await tls_through_balancer(h, proxy_v2(CLIENT, 40000, "127.0.0.4", 465))
        assert (await first.reply()).startswith(b"220 ")
        over = await tls_through_balancer(h, proxy_v2("198.51.100.9", 40000, "127.0.0.4", 465))
        assert (await over.rest()).startswith(b"421 4.7.0")
        for session in (first, over):
            session.close()
        await wait_until(lambda: h.relay.registry.count == 0 and h.relay.registry.refusals_in_tls == 0,
                         what="every slot and refusal given back")
        assert any(line.startswith("refused ") and "reason=max_connections" in line
                   for line in mail_lines(caplog)), mail_lines(caplog)
