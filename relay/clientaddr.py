"""What "one client" means for every per-client limit: the connection caps
(relay/smtpd/connections.py) and the AUTH throttle (relay/auth.py) count the same unit.

An IPv4 address, or the /64 of an IPv6 address (one subscriber, one host's privacy
addresses: RFC 6177 gives a site at least a /64); an IPv4-mapped IPv6 address (a
dual-stack socket) counts as its IPv4 address.
"""

from __future__ import annotations

# It lives beside the failure throttle both the relay and the admin API use (the
# keystore package cannot import the relay's).
from keystore.throttle import client_network

__all__ = ["client_network"]
