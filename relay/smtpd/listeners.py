"""Opening the 587-style (STARTTLS) and 465-style (implicit TLS) listeners.

aiosmtpd's implicit TLS is half-supported (its Controller just passes ssl= to asyncio, so
the protocol never learns it is on TLS), hence the recipe: the 465 listener accepts plain
TCP and `ImplicitTLSAcceptor` (relay/smtpd/connections.py) runs the handshake, counted
against the connection caps from accept; the protocol gets no tls_context (no STARTTLS
inside TLS) and auth_require_tls=False, and our AUTH mechanisms check the transport for
TLS themselves.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from functools import partial

from relay.config import Config, split_hostport
from relay.smtpd.connections import ImplicitTLSAcceptor
from relay.smtpd.data import DataLimits, MemoryBudget
from relay.smtpd.handler import RelayHandler
from relay.smtpd.proxy import ProxyPolicy
from relay.smtpd.proxytls import ProxiedTLSAcceptor
from relay.smtpd.server import ConnectionRegistry, RelaySMTP

__all__ = ["Listener", "Sessions", "open_listeners"]

# Per connection: AUTH at most 3 times (a brake on guessing within one session); every
# other command unlimited, since a pooled client sends many messages per session.
_CALL_LIMITS = {"AUTH": 3, "*": 10**9}
# Messages up to this size are kept in memory while they arrive (within [server]
# max_data_memory for all sessions together); bigger ones go to disk as they arrive.
_IN_MEMORY_MESSAGE = 1 << 20


@dataclass(slots=True)
class Listener:
    kind: str  # "submission" (STARTTLS) or "submissions" (implicit TLS)
    host: str
    port: int
    server: asyncio.Server


class Sessions:
    """Makes the protocol of each new connection from the settings in force: a reload
    (`update`) changes what the next connection gets (certificate, limits, timeouts,
    hostname), while sessions already open keep what they started with."""

    def __init__(
        self, config: Config, handler: RelayHandler, tls: ssl.SSLContext, registry: ConnectionRegistry,
    ) -> None:
        self._handler = handler
        self._registry = registry
        self._memory = MemoryBudget(config.server.max_data_memory)
        self.update(config, tls)

    def update(self, config: Config, tls: ssl.SSLContext) -> None:
        assert config.queue is not None
        cfg = config.server
        self._server = cfg
        self._tls = tls
        self._limits = DataLimits(
            message=cfg.max_message_size, header=cfg.max_header_size,
            in_memory=min(cfg.max_data_memory, _IN_MEMORY_MESSAGE), spool_dir=config.queue.path.parent,
        )
        self._memory.limit = cfg.max_data_memory
        self._proxy = ProxyPolicy.from_config(cfg.proxy_from)
        self._registry.limit = cfg.max_connections
        self._registry.per_address = cfg.max_connections_per_address

    def session(self, implicit: bool, proxied: bool = False) -> RelaySMTP:
        cfg = self._server
        return RelaySMTP(
            self._handler,
            registry=self._registry,
            data_limits=self._limits,
            memory=self._memory,
            hostname=cfg.hostname,
            ident="keyrelay ESMTP",
            tls_context=None if implicit else self._tls,
            auth_require_tls=not implicit,
            auth_required=False,  # enforced in handle_MAIL with our reply
            command_call_limit=_CALL_LIMITS,
            timeout=cfg.idle_timeout,
            pre_auth_timeout=cfg.pre_auth_timeout,
            proxy=self._proxy if proxied else None,
            loop=asyncio.get_running_loop(),
        )

    def starttls(self) -> RelaySMTP:
        """A connection on a STARTTLS (587) listener."""
        return self.session(False)

    def proxied_starttls(self) -> RelaySMTP:
        """A connection on a STARTTLS listener behind a load balancer (`[server]
        proxy_listeners`): a PROXY v2 header first, from a `proxy_from` address."""
        return self.session(False, proxied=True)

    def implicit_tls(self) -> ImplicitTLSAcceptor:
        """A connection on an implicit-TLS (465) listener: TLS first, then the session."""
        return ImplicitTLSAcceptor(self._registry, self._tls, partial(self.session, True))

    def proxied_implicit_tls(self) -> ProxiedTLSAcceptor:
        """A connection on an implicit-TLS listener behind a load balancer: the PROXY v2
        header on the plain connection, then TLS, then the session
        (relay/smtpd/proxytls.py)."""
        return ProxiedTLSAcceptor(self._registry, self._tls, partial(self.session, True), self._proxy)


async def open_listeners(config: Config, sessions: Sessions) -> list[Listener]:
    loop = asyncio.get_running_loop()
    cfg = config.server
    opened: list[Listener] = []
    try:
        for kind, addresses in (("submission", cfg.submission), ("submissions", cfg.submissions)):
            for address in addresses:
                if kind == "submissions" and address in cfg.proxy_listeners:
                    accept = sessions.proxied_implicit_tls
                elif kind == "submissions":
                    accept = sessions.implicit_tls
                elif address in cfg.proxy_listeners:
                    accept = sessions.proxied_starttls
                else:
                    accept = sessions.starttls
                host, port = split_hostport(address)
                server = await loop.create_server(accept, host, port)
                bound = server.sockets[0].getsockname()
                opened.append(Listener(kind, host, bound[1], server))
    except BaseException:
        for listener in opened:
            listener.server.close()
        raise
    return opened
