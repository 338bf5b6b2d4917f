"""The relay's lifecycle: open keystore and queue, start delivery and listeners, and shut
down in the reverse order without losing anything already accepted.

A message answered with 250 is in the spool, so shutdown only has to stop taking new
work, give sessions in DATA a moment to finish, and let running deliveries record what
they did (anything undelivered is picked up from the spool at the next start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg

from keystore import keys
from keystore.opening import open_keystore
from keystore.pg import PgError, is_postgres_url
from keystore.pglimits import PgLimits
from keystore.pgnotify import KeyChanges
from keystore.store import KeyStore, KeystoreUnavailable
from relay import replies
from relay.auth import Authenticator, FailureLimiter
from relay.config import Config, ConfigError, check_secret_files, load_config
from relay.delivery.courier import Courier
from relay.delivery.health import ProviderHealth
from relay.delivery.routing import Router, make_couriers
from relay.fdlimit import ensure_fd_limit
from relay.logformat import set_level
from relay.metrics import Metrics
from relay.metrics.endpoint import MetricsEndpoint
from relay.queue import Queue
from relay.sdnotify import Notifier
from relay.signing import DkimSigner
from relay.smtpd.handler import RelayHandler
from relay.smtpd.listeners import Listener, Sessions, open_listeners
from relay.smtpd.server import ConnectionRegistry
from relay.statefile import StateWriter
from relay.tlsconf import limit_tls_buffers, server_context

__all__ = ["DatabaseDown", "Relay", "Reloadable", "build", "loop_factory", "run", "serve"]

log = logging.getLogger("relay")


class DatabaseDown(Exception):
    """The keystore's PostgreSQL did not answer while the relay started: not up yet (a
    machine's boot, a failover), or out of reach for now. `relay serve` exits 1 for it, so
    systemd's Restart=on-failure tries again, where exit 2 (RestartPreventExitStatus)
    stops for good on what waiting cannot fix: no keystore tables, a lost pepper, a
    schema newer than this relay. (The shared queue's SpoolError exits 1 already.)"""


@contextlib.contextmanager
def _database_down(what: str) -> Iterator[None]:
    """KeystoreUnavailable caused by a connection that failed or broke (psycopg's
    OperationalError: refused, timed out, name not found, the server shutting down or
    refusing the login) becomes DatabaseDown; the keystore's other refusals stay."""
    try:
        yield
    except KeystoreUnavailable as exc:
        if isinstance(exc.__cause__, psycopg.OperationalError):
            raise DatabaseDown(f"{what}: {exc}") from exc
        raise


@contextlib.contextmanager
def _quiet_pool() -> Iterator[None]:
    """While the relay starts, a PostgreSQL pool that cannot connect logs each try; the
    start's own error says it once (the same reason, the password left out). Running, the
    pool's reconnection warnings stay: they tell when the database went and came back."""
    pool_log = logging.getLogger("psycopg.pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(level)


@dataclass(frozen=True, slots=True)
class Reloadable:
    """What a configuration can change in a running relay. Built in full before anything is
    applied, so a config that fails anywhere is refused whole and the old one stays."""

    config: Config
    tls: ssl.SSLContext
    signer: DkimSigner
    couriers: dict[str, Courier]
    router: Router


def build(config: Config, health: ProviderHealth | None = None) -> Reloadable:
    """Load what the config names (certificate, DKIM keys, upstream passwords); ConfigError
    on the first problem. `health`: the relay's provider health, for the router."""
    if config.queue is None or config.routing is None or config.tls is None:
        missing = [n for n in ("tls", "queue", "routing") if getattr(config, n) is None]
        raise ConfigError(f"{config.source}: [{missing[0]}]: required to run the relay")
    check_secret_files(config)
    tls = server_context(config.tls)
    signer = DkimSigner(config.dkim)
    couriers = make_couriers(config)
    return Reloadable(config, tls, signer, couriers, Router(config, couriers, health))


async def open_cluster_limits(config: Config) -> PgLimits | None:
    """With a PostgreSQL keystore, the per-key send rates and the AUTH throttle's failures
    are the cluster's, in that database (keystore/pglimits.py); else None (this relay's
    own, in memory). KeystoreUnavailable if the database cannot be used."""
    url = config.keystore.url
    if url is None or not is_postgres_url(url):
        return None
    try:
        return await PgLimits.open(url, per_minute=config.server.rate_per_minute)
    except PgError as exc:  # the pool's errors name the URL without its password
        raise KeystoreUnavailable(f"cluster limits: {exc}") from exc


# Changes a reload cannot make: (what, how to read it). They wait for a restart, and the
# reload says so; everything else in the new config applies.
_RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("[server] submission / submissions (listeners)",
     lambda c: (c.server.submission, c.server.submissions)),
    ("[server] proxy_listeners", lambda c: c.server.proxy_listeners),
    ("[keystore]", lambda c: c.keystore),
    ("[queue] path", lambda c: c.queue.path if c.queue else None),
    ("[metrics] listen / key_id_labels", lambda c: (c.metrics.listen, c.metrics.key_id_labels)),
    ("[log] format", lambda c: c.log.format),
    ("[queue] url", lambda c: c.queue.url if c.queue else None),
    ("[cluster]", lambda c: c.cluster),
)


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.listeners: list[Listener] = []
        # one Metrics for the relay's life: a reload re-points nothing in it but the
        # certificate's expiry (_apply); provider names come with each attempt
        self.metrics = Metrics(key_id_labels=config.metrics.key_id_labels, node=config.cluster.node)
        self.metrics_endpoint: MetricsEndpoint | None = None  # /metrics, /healthz, /readyz
        self.registry = ConnectionRegistry(
            config.server.max_connections, config.server.max_connections_per_address, metrics=self.metrics,
        )
        self.couriers: dict[str, Courier] = {}
        self.store: KeyStore | None = None
        self.limits: PgLimits | None = None  # send rates and AUTH failures shared with other relays
        self.queue: Queue | None = None
        self.queue_depth: int | None = None  # last count, for STATUS= and the state file
        self._handler: RelayHandler | None = None
        self._authenticator: Authenticator | None = None
        self.key_changes: KeyChanges | None = None  # a PostgreSQL keystore's notifications
        self._sessions: Sessions | None = None
        self._reloading = asyncio.Lock()
        # provider health outlives reloads (every Router gets it; _apply has it follow the config)
        self.health = ProviderHealth(config.provider_health)
        self.health.follow(config)
        self.state: StateWriter | None = None  # the state file `relay status` reads

    def port(self, kind: str = "submission") -> int:
        return next(listener.port for listener in self.listeners if listener.kind == kind)

    async def start(self) -> None:
        cfg = self.config
        parts = build(cfg, self.health)
        assert cfg.queue is not None
        ensure_fd_limit(cfg)
        limit_tls_buffers()
        if cfg.tls is not None:  # build() made sure
            self.metrics.certificate_loaded(cfg.tls.cert)
        if cfg.metrics.listen is not None:  # bound first: a port in use stops the start (exit 2)
            self.metrics_endpoint = MetricsEndpoint.open(self)
        self.couriers = parts.couriers
        ks = cfg.keystore
        with _database_down("keystore"):
            self.store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file,
                                             default_key_limit=ks.default_key_limit)
            self.store.configure_legacy(workers=cfg.auth.legacy_verifications, queue=cfg.auth.legacy_queue,
                                        observer=self.metrics.legacy_check)
            await self._check_routes(cfg)
        if cfg.queue.workers is not None:
            log.warning("%s: [queue] workers is no longer used: each [[upstream]] max_connections "
                        "sets how many deliveries run at once on it", cfg.source)
        self.queue = await Queue.open(
            cfg.queue, cfg.cluster, parts.router, hostname=cfg.server.hostname,
            retry_schedule=cfg.queue.retry_schedule, max_lifetime=cfg.queue.max_queue_lifetime,
            metrics=self.metrics,
        )
        await self.queue.start()
        self.metrics.watch_queue(self.queue.store)
        self.metrics.watch_provider_health(self.health.snapshot)
        with _database_down("keystore"):
            self.limits = await open_cluster_limits(cfg)  # None: this relay's own, in memory
        # the shared ledger's counters are named with a key from the pepper (keys.ledger_key)
        ledger_key = keys.ledger_key(keys.load_pepper(ks.pepper_file)) if self.limits else b""
        self._authenticator = Authenticator(
            self.store,
            FailureLimiter(cfg.auth.max_failures, cfg.auth.failure_window,
                           max_failures_per_address=cfg.auth.address_ceiling,
                           ledger=self.limits.ledger if self.limits else None,
                           ledger_key=ledger_key),
            recheck_interval=cfg.auth.recheck_interval, metrics=self.metrics,
        )
        self._handler = RelayHandler(cfg, self._authenticator, self.queue, parts.signer, metrics=self.metrics,
                                     rates=self.limits.rates if self.limits else None)
        self._sessions = Sessions(cfg, self._handler, parts.tls, self.registry)
        self.listeners = await open_listeners(cfg, self._sessions)
        for listener in self.listeners:
            mode = "STARTTLS" if listener.kind == "submission" else "implicit TLS"
            log.info("listening (%s) on %s port %d", mode, listener.host, listener.port)
        await self._follow_key_changes(cfg)
        self.state = StateWriter.for_relay(self)
        self.state.start()

    async def _follow_key_changes(self, config: Config) -> None:
        """A PostgreSQL keystore is shared: listen for the changes other nodes (and every
        `keystore` CLI or console) make, so an open session here follows a revocation at
        its next command (keystore/pgnotify.py); the periodic recheck stays the safety net."""
        if config.keystore.url is None or self._authenticator is None:
            return
        authenticator = self._authenticator
        changes = self.key_changes = KeyChanges(config.keystore.url, authenticator.key_changed)
        await changes.start()
        self.metrics.watch_key_changes(lambda: changes.listening)

    async def _check_routes(self, config: Config) -> None:
        assert self.store is not None
        known = set(config.route_names)
        for route, users in (await self.store.routes_in_use()).items():
            if route not in known:
                raise ConfigError(
                    f"{config.source}: the keystore routes {', '.join(users[:3])} to {route!r}, "
                    "which is no [[upstream]] or [[group]] here"
                )

    async def _check_routes_for_reload(self, old: Config, new: Config) -> None:
        """_check_routes, for a reload. A keystore that does not answer (its PostgreSQL down
        or restarted under a pooled connection) cannot say which routes it uses; if the new
        config removes none of the old one's, none it uses can go missing (the old one was
        checked), so the reload goes ahead: a certbot renewal's certificate must not wait
        for the database (its hook reloads once). A removed route waits for the check."""
        try:
            await self._check_routes(new)
        except KeystoreUnavailable as exc:
            removed = sorted(set(old.route_names) - set(new.route_names))
            if removed:
                raise ConfigError(
                    f"{new.source}: [[upstream]] or [[group]] {', '.join(map(repr, removed))} is removed, "
                    f"and whether the keystore routes anything to it cannot be checked now ({exc})"
                ) from None
            log.warning("reload: the routes keys and mailboxes use were not checked (the keystore does "
                        "not answer: %s); no route was removed, so none of them is missing", exc)

    async def reload(self) -> bool:
        """Read the config file again and apply it without dropping a session or a message:
        new connections get the new certificate and limits, open sessions the new limits at
        their next command, the next delivery attempt the new upstreams and groups (those
        under way finish on the old ones). A config that fails to load or check is refused
        with one log line, and the one in force stays. True if applied."""
        async with self._reloading:
            old = self.config
            try:
                new = load_config(old.source)
                parts = build(new, self.health)
                ensure_fd_limit(new)  # as the start does: a limit it cannot serve fails at the worst time
                await self._check_routes_for_reload(old, new)
            except (ConfigError, KeystoreUnavailable) as exc:
                log.error("reload refused, the running configuration stays in force: %s", exc)
                return False
            except Exception as exc:  # a loader's bug must not take the running relay down
                log.error("reload refused, the running configuration stays in force: %r", exc,
                          exc_info=True)
                return False
            waiting = [what for what, read in _RESTART_ONLY if read(old) != read(new)]
            if waiting:
                log.warning("reload: %s changed; that takes a restart, the old value stays until then",
                            ", ".join(waiting))
            self._apply(parts)
            retired, self.couriers = self.couriers, parts.couriers
            await asyncio.gather(*(courier.close() for courier in retired.values()))
            log.info("configuration reloaded from %s", old.source)
            return True

    def _apply(self, parts: Reloadable) -> None:
        cfg = parts.config
        assert self._sessions and self._handler and self._authenticator and self.queue and cfg.queue
        self._sessions.update(cfg, parts.tls)
        self._handler.reconfigure(cfg, parts.signer)
        self._authenticator.set_limits(
            max_failures=cfg.auth.max_failures, address_ceiling=cfg.auth.address_ceiling,
            window=cfg.auth.failure_window, recheck_interval=cfg.auth.recheck_interval,
        )
        if self.store is not None:
            self.store.configure_legacy(workers=cfg.auth.legacy_verifications, queue=cfg.auth.legacy_queue)
        self.queue.reconfigure(parts.router, hostname=cfg.server.hostname,
                               retry_schedule=cfg.queue.retry_schedule,
                               max_lifetime=cfg.queue.max_queue_lifetime)
        self.health.follow(cfg)
        if cfg.tls is not None:  # build() made sure
            self.metrics.certificate_loaded(cfg.tls.cert)  # the certificate new connections get
        set_level(cfg.log.level)
        self.config = cfg

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status relay` shows."""
        queued = "?" if self.queue_depth is None else str(self.queue_depth)
        return f"{len(self.registry.live)} session(s), {queued} message(s) queued"

    async def count_queue(self) -> None:
        """Refresh queue_depth; a slow or failing spool keeps the last count."""
        if self.queue is None:
            return
        try:
            self.queue_depth = await asyncio.wait_for(self.queue.store.count(), 2.0)
        except Exception as exc:  # noqa: BLE001 - a status line is no reason to fail
            log.debug("cannot count the queue: %r", exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking connections; sessions not in a transaction get 421 4.3.2 at once,
        those in one get `[server] shutdown_grace` to finish it (a message answered 250
        is in the spool); then deliveries record what they did and stop."""
        if self._handler is not None:
            self._handler.stopping = True
        for listener in self.listeners:
            listener.server.close()
        for handshake in list(self.registry.handshakes):
            handshake.abort()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.server.shutdown_grace if grace is None else grace)
        while self.registry.live and loop.time() < deadline:
            for session in list(self.registry.live):
                if session.envelope is None or not session.envelope.rcpt_tos:
                    session.close_now(replies.SHUTTING_DOWN)
            await asyncio.sleep(0.05)
        # told sessions leave `live` when their connection is lost; the rest are mid-message
        stragglers = [s for s in self.registry.live
                      if s.transport is not None and not s.transport.is_closing()]
        if stragglers:
            log.warning("%d session(s) still in a message after shutdown_grace: closed with 421 4.3.2 "
                        "(their messages were not accepted)", len(stragglers))
        for session in stragglers:
            session.close_now(replies.SHUTTING_DOWN)
        for listener in self.listeners:
            await listener.server.wait_closed()
        if self.key_changes is not None:
            await self.key_changes.stop()
        if self.queue is not None:
            await self.queue.stop()
        await asyncio.gather(*(courier.close() for courier in self.couriers.values()))
        if self.queue is not None:
            await self.queue.close()
        if self.store is not None:
            await self.store.close()
        if self.limits is not None:
            await self.limits.close()
            self.limits = None
        if self.state is not None:  # last: `relay status` says "running" until here
            await self.state.stop()
        if self.metrics_endpoint is not None:  # /readyz has said 503 since the listeners closed
            await self.metrics_endpoint.close()
            self.metrics_endpoint = None


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
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config. Under systemd (Type=notify)
    READY=1 is sent once every listener is bound and the queue is loaded, STATUS= and
    WATCHDOG=1 while running, RELOADING=1 around a reload and STOPPING=1 at the end."""
    relay = Relay(config)
    notifier = Notifier()
    events: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, events.put_nowait, "stop")
    loop.add_signal_handler(signal.SIGHUP, events.put_nowait, "reload")
    alive: asyncio.Task[None] | None = None
    try:
        with _quiet_pool():
            await relay.start()
        await relay.count_queue()
        log.info("relay ready")
        notifier.ready(relay.status_line())

        async def status() -> str:
            await relay.count_queue()
            return relay.status_line()

        alive = loop.create_task(notifier.keep_alive(status))
        while await events.get() == "reload":
            notifier.reloading()
            await relay.reload()
            notifier.ready(relay.status_line())
        log.info("shutting down")
    finally:
        notifier.stopping()
        if alive is not None:
            alive.cancel()
        await relay.stop()
        notifier.close()
