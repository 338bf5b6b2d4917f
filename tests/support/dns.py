"""A real DNS server on loopback (dnspython messages over UDP) serving a test's zone.

    async with DnsServer({("example.net.", "MX"): ["10 mx1.example.net."],
                          ("mx1.example.net.", "A"): ["127.0.0.1"]}) as dns:
        ... dns.port ...

Names not in the zone answer NXDOMAIN; a name present with other types answers NOERROR
with no records (NODATA), as a real authoritative server would.
"""

from __future__ import annotations

import asyncio

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[tuple[str, str]] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            records = self.zone.get((name, rdtype))
            if records:
                response.answer.append(dns.rrset.from_text_list(
                    name, 300, dns.rdataclass.IN, rdtype, records))
            elif not any(n == name for n, _ in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


class DnsServer:
    def __init__(self, zone: dict[tuple[str, str], list[str]]) -> None:
        self.zone = {(name.lower(), rdtype): records for (name, rdtype), records in zone.items()}
        self.protocol = _Protocol(self.zone)
        self.transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self.protocol.queries

    async def __aenter__(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: self.protocol, local_addr=("127.0.0.1", 0))
        return self

    async def __aexit__(self, *exc) -> None:
        if self.transport is not None:
            self.transport.close()
