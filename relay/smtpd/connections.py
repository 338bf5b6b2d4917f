"""Connection slots: who may hold a connection to the submission listeners.

A slot is taken when the TCP connection is accepted and given back when it closes, so a
TLS handshake in progress on the implicit-TLS listener counts like a session. Two caps:

* `limit`: all listeners together (`[server] max_connections`);
* `per_address`: one client address (`[server] max_connections_per_address`); IPv4 is
  counted per address, IPv6 per /64 (one customer's network: a host picks any of 2^64
  addresses in it, so a /128 count would cap nothing).

The implicit-TLS listener (465) accepts plain TCP and starts TLS itself
(`ImplicitTLSAcceptor`): asyncio's `create_server(ssl=...)` tells the protocol nothing
until the handshake is over, so neither the peer's address nor a failed handshake would be
seen, and a slot taken in the protocol factory would leak on every aborted handshake. TLS
is put in place within the accept (`internals.start_server_tls`), the same way on asyncio
and uvloop. Behind a load balancer the PROXY header is read first
(`relay/smtpd/proxytls.py`, a subclass).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from relay import internals, maillog, replies
from relay.clientaddr import client_network
from relay.metrics import Metrics, handshake_failure

if TYPE_CHECKING:
    from relay.smtpd.server import RelaySMTP

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "REFUSALS_OVER_TLS",
    "ConnectionRegistry",
    "ImplicitTLSAcceptor",
    "Slot",
    "address_key",
    "local_port",
]

log = logging.getLogger("relay.smtpd")

# Seconds a TLS handshake may take (465 and STARTTLS). A real client needs well under
# one; asyncio's default of 60 s let a scanner hold a socket for a minute per connect.
HANDSHAKE_TIMEOUT = 10.0
# A client refused on 465 only understands a reply inside TLS, so it gets a handshake and
# then the 421; at most this many such refusals are in their handshake at once (each for
# HANDSHAKE_TIMEOUT at most), beyond that a refused connection is simply closed. This
# bounds what refused clients hold, whatever their number.
REFUSALS_OVER_TLS = 32


def address_key(peer: object) -> str:
    """What the per-address cap counts: "192.0.2.7", "2001:db8:1:2::/64".

    An IPv4-mapped IPv6 peer (a dual-stack socket) counts as its IPv4 address.
    """
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    return client_network(str(host))


def local_port(transport: asyncio.BaseTransport) -> int | None:
    """The listener's port a connection came in on, for the log."""
    sockname = transport.get_extra_info("sockname")
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None


@dataclass(eq=False, slots=True)
class Slot:
    """One counted connection; `release()` may be called any number of times."""

    key: str
    registry: ConnectionRegistry
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.registry._give_back(self)


@dataclass(eq=False)
class ConnectionRegistry:
    """Slots of all listeners, and the sessions and handshakes to close at shutdown."""

    limit: int
    per_address: int
    live: set[RelaySMTP] = field(default_factory=set)  # sessions (greeted)
    handshakes: set[ImplicitTLSAcceptor] = field(default_factory=set)  # 465, TLS not done yet
    refusals_in_tls: int = 0
    metrics: Metrics = field(default_factory=Metrics)  # the sessions and acceptors count here too
    _count: int = 0
    _by_key: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics.watch_connections(lambda: self._count)

    @property
    def count(self) -> int:
        """Connections holding a slot: sessions and handshakes in progress."""
        return self._count

    def refusal(self, peer: object, *, total: bool = True, per_address: bool = True) -> str | None:
        """The 421 for a new connection from `peer`, or None if it may have a slot.
        A proxied listener checks `total` at accept and `per_address` for the real client
        once the PROXY header is read (relay/smtpd/proxy.py)."""
        if total and self._count >= self.limit:
            self.metrics.connection_refused("max_connections")
            return replies.TOO_MANY_CONNECTIONS
        if per_address and self._by_key.get(address_key(peer), 0) >= self.per_address:
            self.metrics.connection_refused("per_address")
            return replies.TOO_MANY_FROM_ADDRESS
        return None

    def take(self, peer: object) -> Slot:
        key = address_key(peer)
        self.metrics.connection_taken()
        self._count += 1
        self._by_key[key] = self._by_key.get(key, 0) + 1
        return Slot(key, self)

    def move(self, slot: Slot, peer: object) -> None:
        """Count `slot` for `peer` from now on: a proxied connection's slot is taken under
        the load balancer's address, then counted for the client the header names."""
        if slot.released:
            return
        self._drop_key(slot.key)
        slot.key = address_key(peer)
        self._by_key[slot.key] = self._by_key.get(slot.key, 0) + 1

    def _give_back(self, slot: Slot) -> None:
        self._count -= 1
        self._drop_key(slot.key)

    def _drop_key(self, key: str) -> None:
        left = self._by_key[key] - 1
        if left:
            self._by_key[key] = left
        else:
            del self._by_key[key]


class _Refusal(asyncio.Protocol):
    """The application protocol of a 465 connection that only gets a 421 inside TLS."""

    def __init__(self, reply: str) -> None:
        self._reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        transport.write(f"{self._reply}\r\n".encode())
        transport.close()


class ImplicitTLSAcceptor(asyncio.Protocol):
    """The protocol of a plain TCP connection on the implicit-TLS listener.

    At accept it takes the connection's slot and puts TLS (bounded by HANDSHAKE_TIMEOUT)
    between the connection and a new session, which starts once the handshake is done.
    A handshake that fails or times out gives the slot back. Over a cap: the 421 inside
    TLS (see REFUSALS_OVER_TLS), then close.
    """

    def __init__(
        self, registry: ConnectionRegistry, tls: ssl.SSLContext, new_session: Callable[[], RelaySMTP],
    ) -> None:
        self._registry = registry
        self._tls = tls
        self._new_session = new_session
        self._transport: asyncio.Transport | None = None
        self._peer: object = None
        self._port: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer, self._port = peer, local_port(transport)
        refusal = self._registry.refusal(peer)
        if refusal is not None:
            maillog.refused(peer, self._port, "submissions", refusal)
        if refusal is None:
            self._start_session(transport, self._registry.take(peer))
        elif self._registry.refusals_in_tls < REFUSALS_OVER_TLS:
            self._registry.refusals_in_tls += 1
            self._start_refusal(transport, refusal)
        else:
            transport.abort()

    def _start_session(self, transport: asyncio.Transport, slot: Slot,
                       client: tuple[str, int] | None = None, received: bytes = b"") -> None:
        """TLS, then a session holding `slot`; `client`: the address a PROXY header named,
        `received`: what came after that header (the start of the handshake)."""
        session = self._new_session()
        session.adopt_slot(slot, client)
        self._registry.handshakes.add(self)
        handshake = internals.start_server_tls(
            transport, session, self._tls, handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        handshake.add_done_callback(lambda done: self._session_handshake_done(done, session, slot))
        _feed(transport, received)

    def _start_refusal(self, transport: asyncio.Transport, refusal: str, received: bytes = b"") -> None:
        """TLS, then the 421 `refusal` (the caller counted it in refusals_in_tls)."""
        self._registry.handshakes.add(self)
        handshake = internals.start_server_tls(
            transport, _Refusal(refusal), self._tls, handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        handshake.add_done_callback(self._refusal_done)
        _feed(transport, received)

    def abort(self) -> None:
        """Shutdown: drop a connection still in its handshake."""
        if self._transport is not None:
            self._transport.abort()

    def _session_handshake_done(self, done: asyncio.Future[None], session: RelaySMTP, slot: Slot) -> None:
        self._registry.handshakes.discard(self)
        self._transport = None
        failed = done.cancelled() or done.exception() is not None or not session.started
        if failed:  # a handshake that worked is counted by the session (RelaySMTP.connection_made)
            error = None if done.cancelled() else done.exception()
            maillog.tls_failed(None, self._peer, self._port, "submissions", error)
            self._registry.metrics.tls_handshake("submissions", handshake_failure(error))
            slot.release()

    def _refusal_done(self, done: asyncio.Future[None]) -> None:
        self._registry.refusals_in_tls -= 1
        self._registry.handshakes.discard(self)
        self._transport = None
        if not done.cancelled():
            done.exception()  # retrieved: a failed refusal is nothing to report


def _feed(transport: asyncio.Transport, received: bytes) -> None:
    """Hand bytes already read off the connection to its protocol now in place (asyncio's
    TLS protocol, a BufferedProtocol: get_buffer, then buffer_updated), as if the
    transport had just read them."""
    protocol = cast(asyncio.BufferedProtocol, transport.get_protocol())
    left = memoryview(received)
    while left and not transport.is_closing():
        buffer = protocol.get_buffer(len(left))
        size = min(len(buffer), len(left))
        buffer[:size] = left[:size]
        protocol.buffer_updated(size)
        left = left[size:]
