"""What "one client" means for every per-client limit: the connection caps
(relay/smtpd/connections.py) and the AUTH throttle (relay/auth.py) count the same unit.

An IPv4 address, or the /64 of an IPv6 address (one subscriber, one host's privacy
addresses: RFC 6177 gives a site at least a /64); an IPv4-mapped IPv6 address (a
dual-stack socket) counts as its IPv4 address.
"""

from __future__ import annotations

import ipaddress

__all__ = ["client_network"]


def client_network(host: str) -> str:
    """"192.0.2.7" -> "192.0.2.7"; "2001:db8:1:2::5" -> "2001:db8:1:2::/64"; anything that
    is not an IP address (a Unix socket's name) is its own unit."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
