"""Per-key client networks (`key create --allow-from CIDR`).

A key may list the networks its tool sends from; a login with the right secret from any
other address is refused with its own reason. The list is stored as one text column
(canonical networks separated by spaces; NULL: anywhere). A login must stay one cheap
read, so the text is parsed once per key and kept, keyed by key id and the stored text:
a changed list is a different text and is parsed afresh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["address_allowed", "canonical_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_CACHE_LIMIT = 100_000  # parsed lists kept; past it the cache starts over (rebuilt by logins)
_parsed: dict[str, tuple[str, tuple[Network, ...]]] = {}


def canonical_networks(values: Iterable[str]) -> str | None:
    """The stored form of `--allow-from` values, or None for none (anywhere).

    Raises ValueError naming the value that is not a network: an address with host bits
    set under its prefix (10.0.0.1/24) is refused rather than silently widened, since the
    operator may have meant a single host."""
    networks: list[Network] = []
    for value in values:
        text = value.strip()
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(
                f"allow-from {value!r} is not a network in CIDR notation "
                f"(e.g. 192.0.2.0/24, 2001:db8::/48, 198.51.100.7): {exc}"
            ) from None
        if network not in networks:
            networks.append(network)
    return " ".join(str(n) for n in networks) or None


def _networks(key_id: str, stored: str) -> tuple[Network, ...]:
    cached = _parsed.get(key_id)
    if cached is not None and cached[0] == stored:
        return cached[1]
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in stored.split())
    if len(_parsed) >= _CACHE_LIMIT:
        _parsed.clear()
    _parsed[key_id] = (stored, networks)
    return networks


def address_allowed(key_id: str, stored: str | None, client_ip: str) -> bool:
    """Whether a key whose allow-from text is `stored` may log in from `client_ip`.

    No list: from anywhere. An IPv4-mapped IPv6 address (::ffff:192.0.2.1, what a dual-stack
    listener reports for an IPv4 client) is judged as the IPv4 address it carries. An
    address that cannot be parsed (no address known) is not in any list."""
    if not stored:
        return True
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in _networks(key_id, stored))
