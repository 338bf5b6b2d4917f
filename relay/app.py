"""The relay's lifecycle: open keystore and queue, start delivery and listeners, and shut
down in the reverse order without losing anything already accepted.

A message answered with 250 is in the spool, so shutdown only has to stop taking new
work, give sessions in DATA a moment to finish, and let running deliveries record what
they did (anything undelivered is picked up from the spool at the next start).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from keystore.store import KeyStore
from relay import replies
from relay.auth import Authenticator, FailureLimiter
from relay.config import Config, ConfigError, check_secret_files
from relay.delivery.courier import Courier
from relay.delivery.routing import Router, make_couriers
from relay.fdlimit import ensure_fd_limit
from relay.queue import Queue
from relay.signing import DkimSigner
from relay.smtpd.handler import RelayHandler
from relay.smtpd.listeners import Listener, open_listeners
from relay.smtpd.server import ConnectionRegistry
from relay.tlsconf import limit_tls_buffers, server_context

__all__ = ["Relay", "loop_factory", "run", "serve"]

log = logging.getLogger("relay")


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[Listener] = []
        self.registry = ConnectionRegistry(
            config.server.max_connections, config.server.max_connections_per_address,
        )
        self.couriers: dict[str, Courier] = {}
        self.store: KeyStore | None = None
        self.queue: Queue | None = None

    def port(self, kind: str = "submission") -> int:
        return next(listener.port for listener in self.listeners if listener.kind == kind)

    async def start(self) -> None:
        cfg = self.config
        if cfg.queue is None or cfg.routing is None or cfg.tls is None:
            missing = [n for n in ("tls", "queue", "routing") if getattr(cfg, n) is None]
            raise ConfigError(f"{cfg.source}: [{missing[0]}]: required to run the relay")
        check_secret_files(cfg)
        ensure_fd_limit(cfg)
        tls = server_context(cfg.tls)
        limit_tls_buffers()
        signer = DkimSigner(cfg.dkim)
        self.couriers = make_couriers(cfg)
        ks = cfg.keystore
        self.store = await KeyStore.open(ks.path, ks.pepper_file, default_key_limit=ks.default_key_limit)
        await self._check_routes()
        if cfg.queue.workers is not None:
            log.warning("%s: [queue] workers is no longer used: each [[upstream]] max_connections "
                        "sets how many deliveries run at once on it", cfg.source)
        self.queue = await Queue.open(
            cfg.queue.path, Router(cfg, self.couriers), hostname=cfg.server.hostname,
            retry_schedule=cfg.queue.retry_schedule, max_lifetime=cfg.queue.max_queue_lifetime,
        )
        await self.queue.start()
        authenticator = Authenticator(
            self.store,
            FailureLimiter(cfg.auth.max_failures, cfg.auth.failure_window,
                           max_failures_per_address=cfg.auth.address_ceiling),
            recheck_interval=cfg.auth.recheck_interval,
        )
        handler = RelayHandler(cfg, authenticator, self.queue, signer)
        self.listeners = await open_listeners(cfg, handler, tls, self.registry)
        for listener in self.listeners:
            mode = "STARTTLS" if listener.kind == "submission" else "implicit TLS"
            log.info("listening (%s) on %s port %d", mode, listener.host, listener.port)

    async def _check_routes(self) -> None:
        assert self.store is not None
        known = set(self.config.route_names)
        for route, users in (await self.store.routes_in_use()).items():
            if route not in known:
                raise ConfigError(
                    f"{self.config.source}: the keystore routes {', '.join(users[:3])} to {route!r}, "
                    "which is no [[upstream]] or [[group]] here"
                )

    async def stop(self, grace: float = 5.0) -> None:
        for listener in self.listeners:
            listener.server.close()
        for handshake in list(self.registry.handshakes):
            handshake.abort()
        deadline = asyncio.get_running_loop().time() + grace
        while self.registry.live and asyncio.get_running_loop().time() < deadline:
            for session in list(self.registry.live):
                if session.envelope is None or not session.envelope.rcpt_tos:
                    session.close_now(replies.SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        for session in list(self.registry.live):
            session.close_now()
        for listener in self.listeners:
            await listener.server.wait_closed()
        if self.queue is not None:
            await self.queue.stop()
        for courier in self.couriers.values():
            await courier.close()
        if self.queue is not None:
            await self.queue.close()
        if self.store is not None:
            await self.store.close()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop unless RELAY_EVENT_LOOP=asyncio: its event loop and TLS are compiled, which
    cuts the relay's CPU per message by about a third (bench/submission.py)."""
    if os.environ.get("RELAY_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed; using the asyncio event loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(config: Config) -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(config))


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    relay = Relay(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
        log.info("relay ready")
        await stop.wait()
        log.info("shutting down")
    finally:
        await relay.stop()
