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
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, ProxyData

__all__ = ["ProxyPolicy"]


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
