"""PROXY protocol v2 on listeners behind a TCP load balancer (`[server] proxy_listeners`).

aiosmtpd reads the header (`SMTP(proxy_protocol_timeout=...)`, before the greeting) and
hands it to the handler's `handle_PROXY`; this module only decides what to make of it:

* a connection whose TCP peer is not in `[server] proxy_from` is closed at once, with no
  greeting (anyone else could claim any address);
* only a version 2 PROXY command carrying a TCP source address is taken: a v1 (text)
  header, a LOCAL command (a balancer's own health check) or a malformed header closes
  the connection, still before the greeting;
* the header's source address becomes the session's peer, so the log's client=, the AUTH
  throttle, each key's allow-from and last-used address and the Received: header all see
  the real client.

Connection caps on a proxied listener: the total cap counts at accept, as elsewhere; the
per-address cap counts the real client address once the header is read (counting the
balancer's address would let 50 clients in all through it).

On an implicit-TLS (465) listener the header comes before the TLS handshake, so aiosmtpd
never sees it: `ProxiedTLSAcceptor` (relay/smtpd/proxytls.py) reads it off the plain
connection, framed by `header_length` and parsed by aiosmtpd's own parser
(`parse_header`), then starts TLS.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, V2_SIGNATURE, ProxyData, get_proxy

__all__ = ["MAX_HEADER", "ProxyPolicy", "header_length", "parse_header"]

# The longest PROXY v2 header taken before implicit TLS: the 16 fixed bytes, the addresses
# (36 for IPv6) and room for a balancer's TLVs (AWS's VPC endpoint id, a few dozen bytes).
# The format allows 64 KiB; nothing a balancer sends needs it, and the bytes are held
# per connection before anything is known of the client.
MAX_HEADER = 4096
_FIXED = 16  # signature (12), version and command, family and protocol, length (2)


@dataclass(frozen=True, slots=True)
class ProxyPolicy:
    """The load balancers a proxied listener accepts a PROXY header from."""

    networks: tuple[IPv4Network | IPv6Network, ...]

    @classmethod
    def from_config(cls, proxy_from: tuple[str, ...]) -> ProxyPolicy:
        return cls(tuple(ip_network(network) for network in proxy_from))

    def allows(self, peer: object) -> bool:
        """Whether the TCP peer (host, port) is one of the load balancers."""
        host = peer[0] if isinstance(peer, tuple) and peer else peer
        try:
            address = ip_address(str(host).partition("%")[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)  # a dual-stack socket's IPv4 peer
        if mapped is not None:
            address = mapped
        return any(address in network for network in self.networks)

    @staticmethod
    def client(data: ProxyData) -> tuple[str, int] | None:
        """The real client (address, port) a valid v2 PROXY header names, else None."""
        if not data.valid or data.version != 2 or data.command != V2_CMD.PROXY:
            return None
        if data.family not in (AF.INET, AF.INET6) or data.protocol != PROTO.STREAM or data.src_addr is None:
            return None
        return str(data.src_addr), int(data.src_port or 0)


def header_length(received: bytes | bytearray) -> int | None:
    """The whole length of the PROXY v2 header `received` begins with, or None while too
    few bytes have come to tell. ValueError as soon as the bytes cannot begin one (no v2
    signature: a v1 header, a ClientHello, anything else) or it is longer than MAX_HEADER."""
    start = bytes(received[:len(V2_SIGNATURE)])
    if start != V2_SIGNATURE[:len(start)]:
        raise ValueError("not a PROXY v2 header")
    if len(received) < _FIXED:
        return None
    (length,) = struct.unpack_from("!H", received, _FIXED - 2)
    if _FIXED + length > MAX_HEADER:
        raise ValueError(f"PROXY v2 header of {_FIXED + length} bytes")
    return _FIXED + length


def parse_header(raw: bytes) -> ProxyData:
    """aiosmtpd's parse of one complete header (the 587 path's parser, `get_proxy`).

    get_proxy reads from a stream; given a stream that already holds the whole header (and
    its end), it never waits, so the coroutine is run to its end here, synchronously: the
    caller switches the connection to TLS in the same callback, before another read."""
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    parsing = get_proxy(reader)
    try:
        parsing.send(None)
    except StopIteration as done:
        return done.value
    parsing.close()  # it waited after all: a header it could not finish is no header
    return ProxyData(version=None).with_error("PROXY header incomplete")
