"""The admin app: one FastAPI application holding the JSON API (api.py) and the console
(console), both over one AdminService. serve.py runs it; tests may too.

`app.state` carries what the routes share: `service` (AdminService), `site` (Site: the
SMTP settings to show, cookie flags) and `logins` (TokenLogins: the throttled token check
the API's bearer header and the console's login form both go through).
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystore.http import api, console, errors
from keystore.http.auth import TokenLogins
from keystore.http.limits import loggable
from keystore.http.site import Site
from keystore.service import AdminService
from keystore.throttle import FailureLimiter

__all__ = ["MAX_BODY", "create_app"]

# method, path (never the query string: a search term, a confirmation; as limits.loggable
# writes it: no line breaks of the client's, no token's secret), status, client
access = logging.getLogger("keystore.http.access")
MAX_BODY = 1 << 20  # bytes a request body may have: the largest real one is a few KiB
DRAIN_LIMIT = 16 << 20  # a larger body is not read at all before the 413


def create_app(service: AdminService, site: Site, *, limiter: FailureLimiter | None = None) -> FastAPI:
    """The app; `limiter` throttles failed token logins (serve.py sizes it from [auth])."""
    app = FastAPI(
        title="keystore admin API",
        version="1",
        description="Workspaces, mailboxes, auth keys, the audit trail and admin tokens of the "
                    "relay's keystore. Authenticate with `Authorization: Bearer rat_...`. Legacy "
                    "passwords (imported from Dovecot or htpasswd) are listed, given a deadline and "
                    "converted to keys here; importing them is the CLI's only (`keystore import`, "
                    "an owner, with the file on the relay's host).",
        openapi_url=f"{api.PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.service = service
    app.state.site = site
    # `is None`, not `or`: a FailureLimiter with no counters has len() 0, so it is falsy
    app.state.logins = TokenLogins(service, FailureLimiter(10, 300.0) if limiter is None else limiter)
    app.state.error_page = None  # the console may set one for its pages (errors.py)
    errors.install(app)
    api.install(app)
    console.install(app)
    app.add_middleware(_Guard)
    return app


class _Guard:
    """For every request: a line in the access log; a body over MAX_BODY is refused with
    413 (FastAPI would read any size into memory; one that does not declare its size is
    stopped once past it: the HTTPException goes through errors.py); every API answer gets
    `Cache-Control: no-store`, since some carry a secret shown once (a new key, a rotated
    key, a new admin token)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            if declared.isdigit() and int(declared) <= DRAIN_LIMIT:
                # read it to the end first (up to DRAIN_LIMIT): a client still sending when
                # the server closes gets a connection reset instead of the answer
                while (await receive()).get("more_body"):
                    pass
            await _too_large(scope, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:  # a chunked body that did not say its size
                    while message.get("more_body") and seen <= DRAIN_LIMIT:  # as above
                        message = await receive()
                        seen += len(message.get("body", b""))
                    raise HTTPException(413, f"request body over {MAX_BODY} bytes")
            return message

        api_path = errors.is_api(scope.get("path", ""))

        status = 0

        async def guarded_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if api_path:
                    headers = [(k, v) for k, v in message.get("headers", ())
                               if k.lower() not in (b"cache-control", b"x-content-type-options")]
                    message = {**message, "headers": [*headers, (b"cache-control", b"no-store"),
                                                      (b"x-content-type-options", b"nosniff")]}
            await send(message)

        started = time.monotonic()
        try:
            await self.app(scope, limited_receive, guarded_send)
        finally:
            client = scope.get("client") or ("-", 0)
            access.info("%s %s %s client=%s %.0fms", scope.get("method"), loggable(scope.get("path", "")),
                        status or "-", client[0], (time.monotonic() - started) * 1000)


async def _too_large(scope: Scope, send: Send) -> None:
    body = json.dumps(errors.error_body("too_large", f"request body over {MAX_BODY} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
