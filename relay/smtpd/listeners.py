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
from relay.smtpd.server import ConnectionRegistry, RelaySMTP

__all__ = ["Listener", "open_listeners"]

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


async def open_listeners(
    config: Config, handler: RelayHandler, tls: ssl.SSLContext, registry: ConnectionRegistry,
) -> list[Listener]:
    loop = asyncio.get_running_loop()
    cfg = config.server
    opened: list[Listener] = []
    assert config.queue is not None
    limits = DataLimits(
        message=cfg.max_message_size, header=cfg.max_header_size,
        in_memory=min(cfg.max_data_memory, _IN_MEMORY_MESSAGE), spool_dir=config.queue.path.parent,
    )
    memory = MemoryBudget(cfg.max_data_memory)

    def factory(implicit: bool):
        def make() -> RelaySMTP:
            return RelaySMTP(
                handler,
                registry=registry,
                data_limits=limits,
                memory=memory,
                hostname=cfg.hostname,
                ident="keyrelay ESMTP",
                tls_context=None if implicit else tls,
                auth_require_tls=not implicit,
                auth_required=False,  # enforced in handle_MAIL with our reply
                command_call_limit=_CALL_LIMITS,
                timeout=cfg.idle_timeout,
                pre_auth_timeout=cfg.pre_auth_timeout,
                loop=loop,
            )
        return make

    try:
        for kind, addresses in (("submission", cfg.submission), ("submissions", cfg.submissions)):
            implicit = kind == "submissions"
            for address in addresses:
                host, port = split_hostport(address)
                accept = (partial(ImplicitTLSAcceptor, registry, tls, factory(True)) if implicit
                          else factory(False))
                server = await loop.create_server(accept, host, port)
                bound = server.sockets[0].getsockname()
                opened.append(Listener(kind, host, bound[1], server))
    except BaseException:
        for listener in opened:
            listener.server.close()
        raise
    return opened
