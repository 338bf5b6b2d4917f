"""The PROXY v2 header on an implicit-TLS (465) listener behind a load balancer.

There the balancer's header comes before the TLS handshake, on the plain connection, so
aiosmtpd (which reads it as the first thing of a session) would only see it inside TLS,
where it never is. `ProxiedTLSAcceptor` reads it at accept instead, the same rules as
the 587 path (relay/smtpd/proxy.py):

* a TCP peer outside `[server] proxy_from` is closed at once: no TLS, a `refused` line
  (reason=not_a_proxy) and the same metric;
* then bytes are taken until one whole v2 header (at most MAX_HEADER bytes, within
  PROXY_HEADER_TIMEOUT, the time aiosmtpd gives it on 587); a v1, LOCAL, malformed,
  oversized, late or missing header closes the connection, still without TLS
  (reason=proxy_header);
* the header's client is counted by the per-address cap (over it: the 421 inside TLS, as
  for any 465 refusal), TLS starts, and the bytes read past the header (a balancer may
  forward the ClientHello in the same segment) go to the TLS protocol first;
* the session is told the client (`RelaySMTP.adopt_slot`): its peer, and so the log, the
  AUTH throttle, allow-from, last-used address and Received:, are the client's, and it
  expects no header of its own.

The slot is taken at accept under the balancer's address (max_connections bounds the
connections waiting for their header too) and counted for the client once it is known.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from relay import maillog
from relay.smtpd.connections import (
    HANDSHAKE_TIMEOUT,
    REFUSALS_OVER_TLS,
    ConnectionRegistry,
    ImplicitTLSAcceptor,
    Slot,
    local_port,
)
from relay.smtpd.proxy import ProxyPolicy, header_length, parse_header

if TYPE_CHECKING:
    from relay.smtpd.server import RelaySMTP

__all__ = ["PROXY_HEADER_TIMEOUT", "ProxiedTLSAcceptor"]

# Seconds from accept to the whole header: what the 587 path gives aiosmtpd
# (RelaySMTP's proxy_protocol_timeout).
PROXY_HEADER_TIMEOUT = HANDSHAKE_TIMEOUT


class ProxiedTLSAcceptor(ImplicitTLSAcceptor):
    """A plain TCP connection on an implicit-TLS listener in `[server] proxy_listeners`:
    the PROXY header first, then TLS and the session (see the module's docstring)."""

    def __init__(
        self, registry: ConnectionRegistry, tls: ssl.SSLContext, new_session: Callable[[], RelaySMTP],
        proxy: ProxyPolicy,
    ) -> None:
        super().__init__(registry, tls, new_session)
        self._proxy = proxy
        self._received = bytearray()
        self._reading = False  # waiting for the header
        self._slot: Slot | None = None
        self._over_total: str | None = None  # over max_connections at accept: this 421, in TLS
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        self._peer, self._port = peer, local_port(transport)
        if not self._proxy.allows(peer):
            self._registry.metrics.connection_refused("not_a_proxy")
            maillog.proxy_refused(peer, self._port, "not_a_proxy", listener="submissions")
            transport.close()
            return
        refusal = self._registry.refusal(peer, per_address=False)  # the client's: once known
        if refusal is not None:
            maillog.refused(peer, self._port, "submissions", refusal)
            if self._registry.refusals_in_tls >= REFUSALS_OVER_TLS:
                transport.abort()
                return
            self._registry.refusals_in_tls += 1
            self._over_total = refusal
        else:
            self._slot = self._registry.take(peer)
        self._transport = transport
        self._reading = True
        self._registry.handshakes.add(self)  # aborted at shutdown, as a handshake is
        self._timer = asyncio.get_running_loop().call_later(PROXY_HEADER_TIMEOUT, self._header_late)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return
        self._received += data
        try:
            length = header_length(self._received)
        except ValueError:
            self._no_header(close=True)
            return
        if length is None:
            return
        header, rest = bytes(self._received[:length]), bytes(self._received[length:])
        client = ProxyPolicy.client(parse_header(header))
        if client is None:  # v1 is refused by header_length already; LOCAL, malformed: here
            self._no_header(close=True)
            return
        self._header_read()
        transport = self._transport
        assert transport is not None
        self._peer = client  # a failed handshake is logged for the client
        if self._over_total is not None:
            self._start_refusal(transport, self._over_total, rest)
            return
        slot = self._slot
        assert slot is not None
        refusal = self._registry.refusal(client, total=False)
        if refusal is None:
            self._registry.move(slot, client)
            self._start_session(transport, slot, client, rest)
            return
        maillog.refused(client, self._port, "submissions", refusal)
        slot.release()
        if self._registry.refusals_in_tls < REFUSALS_OVER_TLS:
            self._registry.refusals_in_tls += 1
            self._start_refusal(transport, refusal, rest)
        else:
            self._registry.handshakes.discard(self)
            self._transport = None
            transport.abort()

    def eof_received(self) -> bool | None:
        return False  # the header's end never came: close (connection_lost says why)

    def connection_lost(self, error: Exception | None) -> None:
        if self._reading:  # the client or balancer left before a whole header
            self._no_header(close=False)

    def _header_late(self) -> None:
        self._timer = None
        if self._reading:
            self._no_header(close=True)

    def _header_read(self) -> None:
        """Stop waiting for the header; the acceptor stays in `handshakes` during TLS."""
        self._reading = False
        self._received = bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _no_header(self, *, close: bool) -> None:
        """No valid header (none, malformed, not v2, LOCAL, too long, too late): the
        connection ends with no TLS, its slot (or its place among the refusals) freed."""
        self._header_read()
        self._registry.handshakes.discard(self)
        if self._over_total is not None:
            self._registry.refusals_in_tls -= 1  # its 421 is already logged
        else:
            self._registry.metrics.connection_refused("proxy_header")
            maillog.proxy_refused(self._peer, self._port, "proxy_header", listener="submissions")
        if self._slot is not None:
            self._slot.release()
        transport, self._transport = self._transport, None
        if close and transport is not None:
            transport.abort()  # what the client sent unread: no point in a graceful close
