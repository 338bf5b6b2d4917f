"""Direct MX delivery against a real DNS server and real SMTP servers, all on loopback:
MX and implicit-MX routing, preference order and failover, DNS failures, per-recipient
replies, and opportunistic STARTTLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from aiosmtpd.smtp import SMTP, TLSSetupException

from relay.config import DnsConfig, UpstreamConfig
from relay.delivery.courier import Status
from relay.delivery.mx import MxCourier, _by_preference, _public
from relay.tlsconf import generate_self_signed
from tests.support.dns import DnsServer
from tests.support.sink import SinkHandler

MESSAGE = b"From: alice@example.com\r\nSubject: hello\r\n\r\nhi\r\n"


@contextlib.asynccontextmanager
async def courier_for(port: int, dns_port: int, *, dns_timeout: float = 2):
    courier = MxCourier(
        UpstreamConfig(name="mx", kind="mx", port=port, timeout=5, allow_private_targets=True),
        DnsConfig(nameservers=("127.0.0.1",), port=dns_port, timeout=dns_timeout),
        local_hostname="relay.test",
    )
    try:
        yield courier
    finally:
        await courier.close()


async def deliver(zone, sink_port: int, rcpts: list[str]):
    async with DnsServer(zone) as dns, courier_for(sink_port, dns.port) as courier:
        return await courier.deliver("alice@example.com", rcpts, MESSAGE), dns.queries


async def test_mx_then_a_delivers_to_the_host(sink):
    zone = {("example.net.", "MX"): ["10 mx1.example.net."], ("mx1.example.net.", "A"): ["127.0.0.1"]}
    outcomes, queries = await deliver(zone, sink.port, ["bob@Example.NET", "carol@example.net"])
    assert {r: o.status for r, o in outcomes.items()} == {
        "bob@Example.NET": Status.SENT, "carol@example.net": Status.SENT}
    assert outcomes["bob@Example.NET"].reply.startswith("250 ")
    (message,) = sink.messages  # one transaction for the domain, whatever the case of its name
    assert message.rcpt_tos == ["bob@Example.NET", "carol@example.net"]
    assert message.mail_from == "alice@example.com" and b"Subject: hello" in message.data
    assert queries[:2] == [("example.net.", "MX"), ("mx1.example.net.", "A")]


async def test_two_domains_go_to_their_own_hosts(sink):
    zone = {
        ("one.test.", "MX"): ["10 mx.one.test."], ("mx.one.test.", "A"): ["127.0.0.1"],
        ("two.test.", "MX"): ["10 mx.two.test."], ("mx.two.test.", "A"): ["127.0.0.1"],
    }
    outcomes, queries = await deliver(zone, sink.port, ["a@one.test", "b@two.test", "c@one.test"])
    assert all(o.status is Status.SENT for o in outcomes.values()) and len(outcomes) == 3
    assert sorted(m.rcpt_tos for m in sink.messages) == [["a@one.test", "c@one.test"], ["b@two.test"]]
    assert {("mx.one.test.", "A"), ("mx.two.test.", "A")} <= set(queries)


async def test_lowest_preference_first_and_failover_to_the_next_host(sink):
    zone = {
        ("example.net.", "MX"): ["20 backup.example.net.", "10 primary.example.net."],
        ("primary.example.net.", "A"): ["127.0.0.2"],  # nothing listens there
        ("backup.example.net.", "A"): ["127.0.0.1"],
    }
    outcomes, queries = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.SENT
    assert len(sink.messages) == 1
    a_lookups = [name for name, rdtype in queries if rdtype == "A"]
    assert a_lookups == ["primary.example.net.", "backup.example.net."]


def test_equal_preferences_are_shuffled_and_null_exchanges_dropped():
    def mx(text: str):
        return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, text)

    records = [mx("20 c.test."), mx("10 a.test."), mx("10 b.test."), mx("30 .")]
    orders = {tuple(_by_preference(records)) for _ in range(100)}
    assert orders == {("a.test.", "b.test.", "c.test."), ("b.test.", "a.test.", "c.test.")}


async def test_no_mx_falls_back_to_the_domains_address(sink):
    zone = {("example.net.", "A"): ["127.0.0.1"]}
    outcomes, queries = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.SENT
    assert sink.messages[0].rcpt_tos == ["bob@example.net"]
    assert queries[:2] == [("example.net.", "MX"), ("example.net.", "A")]


async def test_no_mx_and_no_address_fails(sink):
    zone = {("example.net.", "TXT"): ['"v=spf1 -all"']}
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.FAILED
    assert outcomes["bob@example.net"].reply.startswith("550 5.1.2 ")


async def test_nxdomain_fails(sink):
    outcomes, _ = await deliver({}, sink.port, ["bob@nowhere.test"])
    assert outcomes["bob@nowhere.test"].status is Status.FAILED
    assert outcomes["bob@nowhere.test"].reply == "550 5.1.2 nowhere.test: domain does not exist"
    assert sink.handler.connections == 0


async def test_null_mx_fails_with_556(sink):
    zone = {("example.net.", "MX"): ["0 ."], ("example.net.", "A"): ["127.0.0.1"]}
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.FAILED
    assert outcomes["bob@example.net"].reply.startswith("556 5.1.10 ")
    assert sink.handler.connections == 0


async def test_dns_server_not_answering_defers(sink):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        silent_port = probe.getsockname()[1]
    async with courier_for(sink.port, silent_port, dns_timeout=0.5) as courier:
        outcomes = await courier.deliver("alice@example.com", ["bob@example.net"], MESSAGE)
    assert outcomes["bob@example.net"].status is Status.DEFERRED
    assert outcomes["bob@example.net"].reply.startswith("451 4.4.3 ")


async def test_mx_host_without_address_defers(sink):
    zone = {("example.net.", "MX"): ["10 gone.example.net."]}
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.DEFERRED
    assert outcomes["bob@example.net"].reply.startswith("451 4.4.4 ")


async def test_one_recipient_refused_for_good_the_other_sent(sink):
    sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 no such user"
    zone = {("example.net.", "MX"): ["10 mx.example.net.", "20 mx2.example.net."],
            ("mx.example.net.", "A"): ["127.0.0.1"], ("mx2.example.net.", "A"): ["127.0.0.1"]}
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net", "nobody@example.net"])
    assert outcomes["bob@example.net"].status is Status.SENT
    assert outcomes["nobody@example.net"].status is Status.FAILED
    assert outcomes["nobody@example.net"].reply == "550 5.1.1 no such user"
    assert sink.handler.connections == 1  # a 5xx is final: the backup host is not asked


async def test_all_hosts_answering_4xx_defers_with_the_remote_reply(sink):
    sink.handler.data_reply = "451 4.3.0 try again later"
    zone = {("example.net.", "MX"): ["10 mx1.example.net.", "20 mx2.example.net."],
            ("mx1.example.net.", "A"): ["127.0.0.1"], ("mx2.example.net.", "A"): ["127.0.0.1"]}
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.DEFERRED
    assert outcomes["bob@example.net"].reply == "451 4.3.0 try again later"
    assert sink.handler.attempts == 2  # both hosts were tried


async def test_a_recipient_deferred_by_one_host_is_tried_on_the_next(sink):
    zone = {("example.net.", "MX"): ["10 mx1.example.net.", "20 mx2.example.net."],
            ("mx1.example.net.", "A"): ["127.0.0.1"], ("mx2.example.net.", "A"): ["127.0.0.1"]}

    async def rcpt(server, session, envelope, address, options):
        if address == "later@example.net" and sink.handler.connections == 1:
            return "450 4.2.0 mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    sink.handler.handle_RCPT = rcpt
    outcomes, _ = await deliver(zone, sink.port, ["bob@example.net", "later@example.net"])
    assert {o.status for o in outcomes.values()} == {Status.SENT}
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.net"], ["later@example.net"]]


class TlsRecordingHandler(SinkHandler):
    tls_used: list[bool]

    async def handle_DATA(self, server, session, envelope):
        self.tls_used.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


@contextlib.asynccontextmanager
async def starttls_server(host: str, port: int, context: ssl.SSLContext):
    handler = TlsRecordingHandler()
    handler.tls_used = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mx.test", tls_context=context, loop=loop), host, port)
    try:
        yield handler, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_starttls_is_used_when_offered(tmp_path):
    generate_self_signed("mx.test", tmp_path / "cert.pem", tmp_path / "key.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    zone = {("example.net.", "MX"): ["10 mx.example.net."], ("mx.example.net.", "A"): ["127.0.0.1"]}
    async with starttls_server("127.0.0.1", 0, context) as (handler, port):
        outcomes, _ = await deliver(zone, port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.SENT
    assert handler.tls_used == [True]


async def test_failed_tls_handshake_moves_on_to_the_next_host(sink, caplog):
    no_certificate = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    zone = {("example.net.", "MX"): ["10 broken.example.net.", "20 plain.example.net."],
            ("broken.example.net.", "A"): ["127.0.0.2"], ("plain.example.net.", "A"): ["127.0.0.1"]}
    async with starttls_server("127.0.0.2", sink.port, no_certificate) as (handler, _):
        outcomes, _ = await deliver(zone, sink.port, ["bob@example.net"])
    assert outcomes["bob@example.net"].status is Status.SENT
    assert handler.tls_used == [] and len(sink.messages) == 1
    assert any(isinstance(r.exc_info[1], TLSSetupException) for r in caplog.records if r.exc_info)


async def test_malformed_recipients_fail_without_a_lookup(sink):
    outcomes, queries = await deliver({}, sink.port, ["nodomain", "x@[127.0.0.1]", "y@bad..name"])
    assert {o.status for o in outcomes.values()} == {Status.FAILED}
    assert queries == []


async def test_mx_pointing_at_loopback_is_refused_unless_allowed():
    zone = {("evil.example.", "MX"): ["10 mx.evil.example."], ("mx.evil.example.", "A"): ["127.0.0.1"]}
    async with DnsServer(zone) as server:
        courier = MxCourier(UpstreamConfig(name="mx", kind="mx", port=25, timeout=2),
                            DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=2),
                            local_hostname="relay.test")
        outcomes = await courier.deliver("a@example.com", ["x@evil.example"], b"Subject: x\r\n\r\nx\r\n")
        assert outcomes["x@evil.example"].status == "failed"
        assert outcomes["x@evil.example"].reply.startswith("550 5.4.4 ")


@pytest.mark.parametrize("address", [
    "64:ff9b::127.0.0.1",  # NAT64 well-known prefix (RFC 6052)
    "64:ff9b::10.0.0.1",
    "64:ff9b::192.168.1.1",
    "64:ff9b:1::a00:1",  # RFC 8215 local-use NAT64: a translator inside our own network
    "64:ff9b:1:c0a8:1:100::",  # ... with the address at the /48 position
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:0:10.0.0.1",  # IPv4-translated (SIIT)
    "::127.0.0.1",  # IPv4-compatible (deprecated)
])
async def test_mx_behind_an_ipv6_form_of_a_private_address_is_refused(address):
    """An IPv6 address embedding a loopback or private IPv4 address reaches that address."""
    zone = {("evil.example.", "MX"): ["10 mx.evil.example."], ("mx.evil.example.", "AAAA"): [address]}
    async with DnsServer(zone) as server:
        courier = MxCourier(UpstreamConfig(name="mx", kind="mx", port=25, timeout=2),
                            DnsConfig(nameservers=("127.0.0.1",), port=server.port, timeout=2),
                            local_hostname="relay.test")
        outcomes = await courier.deliver("a@example.com", ["x@evil.example"], b"Subject: x\r\n\r\nx\r\n")
        assert ("mx.evil.example.", "AAAA") in server.queries
    assert outcomes["x@evil.example"].status == "failed"
    assert outcomes["x@evil.example"].reply == (
        "550 5.4.4 mx.evil.example. has only private or loopback addresses")


@pytest.mark.parametrize("address", ["64:ff9b::8.8.8.8", "2002:808:808::1", "::ffff:8.8.8.8", "8.8.8.8",
                                     "2001:4860:4860::8888"])
def test_ipv6_forms_of_public_addresses_stay_usable(address):
    assert _public(address)
