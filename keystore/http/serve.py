"""`keystore serve`: run the admin app (app.py) with uvicorn until SIGTERM or SIGINT.

* Where: `--listen HOST:PORT`, else [admin] listen; neither is a usage error (exit 2),
  since serving on a guessed address is worse than not serving.
* Loopback (127.0.0.0/8, ::1, localhost): plain HTTP. Anywhere else: HTTPS with the
  relay's [tls] certificate and key (relay/tlsconf.py's checks and TLS 1.2 floor); no
  [tls] is exit 2, never a silent fallback to clear text.
* The socket is bound here, before uvicorn starts (port 0 works: the ready line says the
  port the kernel chose), and a bind failure is one line and exit 2.
* Ready: exactly one line on stdout, flushed: `admin console on http://HOST:PORT/`.
  Everything else (the access log, failures) goes to stderr.
* SIGTERM / SIGINT: stop accepting, let requests in flight finish (5 s at most), exit 0.

This is the one module of keystore/http that reads the relay's config (a relay.config
Config, handed over by keystore/cli.py) and imports from the relay package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Generator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystore.http.app import create_app
from keystore.http.site import Site, is_loopback
from keystore.service import AdminService
from keystore.store import KeyStore
from keystore.throttle import FailureLimiter

__all__ = ["run"]

EXIT_USAGE = 2
log = logging.getLogger("keystore.http")


def _say(message: str) -> None:
    print(f"keystore serve: {message}", file=sys.stderr, flush=True)


def _first_port(listeners: tuple[str, ...]) -> int | None:
    """The port of the first listener, to tell mail clients; None for none (or port 0, an
    ephemeral port nobody could configure a client with)."""
    from relay.config import split_hostport

    for listener in listeners:
        try:
            return split_hostport(listener)[1] or None
        except ValueError:
            continue
    return None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _url(scheme: str, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}/" if ":" in host else f"{scheme}://{host}:{port}/"


def _setup_logging() -> None:
    """stderr for our lines (the access log: method, path without its query string,
    status, client) and uvicorn's warnings; stdout stays the ready line's alone."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name, level in (("keystore.http", logging.INFO), ("uvicorn", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class _Answered:
    """The app for uvicorn: an exception raised after the whole answer went out ends here.

    Starlette answers a bug with errors.py's 500 (which logs it with its traceback) and then
    raises it again; uvicorn, seeing an exception after the response started, logs the
    traceback a second time and closes the connection, so a client's next request on its
    kept-alive connection fails with a reset. An answer cut short still reaches uvicorn
    (the client must see it broken)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answered = False

        async def watched(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        try:
            await self.app(scope, receive, watched)
        except Exception:
            if not answered:
                raise


class _Server(uvicorn.Server):
    """uvicorn's server, with our signal handling (uvicorn's re-raises the signal once
    stopped, so SIGTERM would end the process with -15 rather than exit 0) and our ready
    line."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # run() installs loop signal handlers that set should_exit

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready_line, flush=True)


async def run(store: KeyStore, config: Any, *, listen: str | None) -> int:
    """Serve until stopped; the exit status (0, or 2 with one line on stderr)."""
    from relay.config import ConfigError, split_hostport
    from relay.tlsconf import server_context

    address = listen or config.admin.listen
    if not address:
        _say(f"no [admin] listen in {config.source} and no --listen HOST:PORT: nothing to serve")
        return EXIT_USAGE
    try:
        host, port = split_hostport(address)
    except ValueError as exc:
        _say(f"listen address {address!r}: {exc}")
        return EXIT_USAGE
    context: ssl.SSLContext | None = None
    if not is_loopback(host):
        if config.tls is None:
            _say(f"{address} is not a loopback address: serving it needs HTTPS, and there is no [tls] "
                 "certificate in the config")
            return EXIT_USAGE
        try:
            context = server_context(config.tls)
        except ConfigError as exc:
            _say(str(exc))
            return EXIT_USAGE
    try:
        sock = _bind(host, port)
    except OSError as exc:
        _say(f"cannot listen on {address}: {exc.strerror or exc}")
        return EXIT_USAGE

    site = Site(
        smtp_host=config.admin.public_host or config.server.hostname,
        submission_port=_first_port(config.server.submission),
        submissions_port=_first_port(config.server.submissions),
        secure_cookies=context is not None,
        session_ttl=float(config.admin.session_ttl),
    )
    limiter = FailureLimiter(config.auth.max_failures, config.auth.failure_window,
                             max_failures_per_address=config.auth.address_ceiling)
    app = create_app(AdminService(store, route_names=config.route_names), site, limiter=limiter)
    _setup_logging()
    server = _Server(
        uvicorn.Config(
            _Answered(app), log_config=None, access_log=False, proxy_headers=False, server_header=False,
            timeout_graceful_shutdown=5, ssl_context_factory=(lambda *_: context) if context else None,
        ),
        ready_line=f"admin console on {_url('https' if context else 'http', sock)}",
    )
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await server.serve(sockets=[sock])
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sock.close()
    return 0 if server.started else EXIT_USAGE
