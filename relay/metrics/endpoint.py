"""The operations HTTP endpoint on `[metrics] listen`: /metrics, /healthz, /readyz.

It runs on threads of its own (the standard library's WSGI server with a thread per
request), never on the relay's event loop: a wedged loop must not also wedge the probe
that reports it, and a scrape must never slow an SMTP session. HTTP parsing is the
standard library's; /metrics is prometheus-client's WSGI app (text or OpenMetrics as
the scraper asks, gzip if it accepts it).

    /metrics   Prometheus exposition of the relay's Metrics registry
    /healthz   200 {"status": "ok"} if the event loop answers within LOOP_WAIT, else 503
    /readyz    200 {"ready": true}, or 503 {"ready": false, "failing": {part: why}}
    other      404 JSON

Keep it on loopback or a private network: it has no authentication (the readiness
answers name file paths; nothing in it is secret).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from socketserver import TCPServer, ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app

from relay.config import Config, ConfigError, split_hostport
from relay.metrics import Metrics
from relay.metrics.readiness import Readiness

__all__ = ["MetricsEndpoint"]

log = logging.getLogger("relay.metrics")

_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_PATHS = ["/metrics", "/healthz", "/readyz"]


class _Listener(Protocol):
    kind: str
    port: int

    @property
    def server(self) -> Any: ...


class RelayView(Protocol):
    """What the endpoint needs of relay.app.Relay."""

    config: Config
    metrics: Metrics

    @property
    def listeners(self) -> Sequence[_Listener]: ...


# Requests served at once; a connection beyond them is closed as soon as it is accepted.
# Each one is a descriptor and a thread, and the relay's descriptors are budgeted for SMTP
# (relay/fdlimit.py): a flood of slow requests on this port must not starve the listeners,
# the spool or the keystore of them. A few scrapers and probes need no more.
MAX_REQUESTS = 8


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in flight never holds up the relay's exit
    request_queue_size = 64  # the listen backlog: a burst of probes waits rather than being dropped

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver's own prints a traceback to stderr, past the log's format (a JSON
        log would get raw lines) for every client that times out or resets."""
        log.debug("metrics endpoint: request from %s failed: %r", client_address, sys.exc_info()[1])

    def server_bind(self) -> None:
        """HTTPServer's own looks the address up in DNS (getfqdn), which can take seconds."""
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(WSGIRequestHandler):
    timeout = 10  # seconds: a connection that sends nothing does not keep its thread

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics endpoint: " + format, *args)


class MetricsEndpoint:
    """Bound when made (a port in use is a ConfigError: exit 2), served until close()."""

    def __init__(self, listen: str, metrics: Metrics, readiness: Readiness, *, where: str) -> None:
        host, port = split_hostport(listen)
        self._readiness = readiness
        self._metrics_app = make_wsgi_app(metrics.exposed)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = _Server6 if family == socket.AF_INET6 else _Server
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"{where} listen {listen!r}: cannot listen there: {reason}") from None
        self._server.set_app(self._app)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, relay: RelayView) -> MetricsEndpoint:
        """The relay's endpoint on `[metrics] listen`; call on the relay's event loop."""
        config = relay.config
        assert config.metrics.listen is not None
        readiness = Readiness(
            loop=asyncio.get_running_loop(),
            listening=lambda: listeners_problem(config, relay.listeners),
            spool_folder=config.queue.path.parent if config.queue is not None else None,
            keystore=config.keystore.url or config.keystore.path,
            pepper=config.keystore.pepper_file,
            queue_url=config.queue.url if config.queue is not None else None,
        )
        return cls(config.metrics.listen, relay.metrics, readiness, where=f"{config.source}: [metrics]")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    async def close(self) -> None:
        """Stop serving (waits for the server's loop, at most its 0.2 s poll) and unbind."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        self._thread.join()

    # ------------------------------------------------------------ WSGI

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/healthz":
            problem = self._readiness.alive()
            if problem is None:
                return _json(start_response, "200 OK", {"status": "ok"})
            return _json(start_response, "503 Service Unavailable", {"status": problem})
        if path == "/readyz":
            failing = self._readiness.problems()
            if not failing:
                return _json(start_response, "200 OK", {"ready": True})
            return _json(start_response, "503 Service Unavailable", {"ready": False, "failing": failing})
        return _json(start_response, "404 Not Found", {"error": "not found", "paths": _PATHS})


def _json(start_response: Callable[..., Any], status: str, body: object) -> list[bytes]:
    data = json.dumps(body).encode() + b"\n"
    start_response(status, [*_JSON, ("Content-Length", str(len(data)))])
    return [data]


def listeners_problem(config: Config, listeners: Sequence[_Listener]) -> str | None:
    """None when every configured SMTP listener is bound and serving (run on the loop)."""
    wanted = len(config.server.submission) + len(config.server.submissions)
    serving = sum(1 for listener in listeners if listener.server.is_serving())
    if wanted and serving == wanted:
        return None
    return f"{serving} of {wanted} SMTP listeners serving"
