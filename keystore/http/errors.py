"""Errors as the API answers them: `{"error": {"code": "...", "message": "..."}}`.

The codes are a contract with scripts (they branch on the code, people read the message):

| code        | status | when                                                          |
|-------------|--------|---------------------------------------------------------------|
| invalid     | 400    | bad input: a keystore refusal (StoreError) or a request that  |
|             |        | does not fit the endpoint (names the field)                   |
| unauthorized| 401    | no, malformed, unknown or revoked admin token                 |
| forbidden   | 403    | the token's role or workspaces do not allow it                |
| not_found   | 404    | no such record (or one the token cannot see), no such endpoint|
| method_not_allowed | 405 | the endpoint exists, not with this method                 |
| conflict    | 409    | the record's state refuses it (already revoked, ...)          |
| too_large   | 413    | a request body over MAX_BODY                                  |
| throttled   | 429    | too many failed token logins from this address (Retry-After)  |
| unavailable | 503    | the keystore database cannot be used right now                |
| internal    | 500    | a bug: logged with its traceback, never with a secret         |

Under /api/ every error is JSON. Elsewhere (the console) the same exceptions go to
`app.state.error_page(request, status, message)` when the console sets one, else to a
plain-text page.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from keystore.http.limits import loggable
from keystore.service import Forbidden
from keystore.store import Conflict, KeystoreUnavailable, NotFound, StoreError

__all__ = ["API_PREFIX", "ApiError", "Throttled", "Unauthorized", "error_body", "install", "is_api"]

API_PREFIX = "/api/"
log = logging.getLogger("keystore.http")


class ApiError(Exception):
    """An answer other than success, raised anywhere in a request; `install` renders it."""

    status = 400
    code = "invalid"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


class Unauthorized(ApiError):
    """No usable admin token. One message for unknown, wrong and revoked tokens: the
    answer must not tell a guesser which part was right."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, *, presented: bool = False) -> None:
        # RFC 6750 section 3: the scheme always; error="invalid_token" when one was sent
        challenge = 'Bearer realm="keystore"' + (', error="invalid_token"' if presented else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Throttled(ApiError):
    """Too many failed token logins from the client's address (keystore/throttle.py)."""

    status = 429
    code = "throttled"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed admin token logins from this address; "
                         f"try again in {retry_after} s", headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


_STORE_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (Forbidden, 403, "forbidden"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (StoreError, 400, "invalid"),  # last: the others are StoreErrors too
)
_HTTP_CODES = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "too_large", 429: "throttled",
               503: "unavailable"}


def is_api(path: str) -> bool:
    """Whether a request path is the API's (/api itself included: its 404 is JSON too)."""
    return path == API_PREFIX.rstrip("/") or path.startswith(API_PREFIX)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def _answer(request: Request, status: int, code: str, message: str,
            headers: Mapping[str, str] | None = None) -> Response:
    if is_api(request.url.path):
        return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))
    page = getattr(request.app.state, "error_page", None)
    if page is not None:
        response = page(request, status, message)
        for name, value in (headers or {}).items():
            response.headers.setdefault(name, value)
        return response
    return PlainTextResponse(message, status_code=status, headers=dict(headers or {}))


def validation_message(exc: RequestValidationError) -> str:
    """Pydantic's findings as one line an operator can act on, naming each field:
    `rate_limit: Input should be a valid integer; colour: unknown field`."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where, path = (loc[0], loc[1:]) if loc else ("body", [])
        kind = error.get("type", "")
        if kind == "json_invalid":
            detail = error.get("ctx", {}).get("error", "malformed")
            parts.append(f"the request body is not valid JSON ({detail})")
            continue
        if where == "body" and not path:  # no body, or not a JSON object (a form, a list)
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
            continue
        field = ".".join(path) or where
        if where in ("query", "path", "header"):
            field = f"{field} ({where} parameter)"
        message = "unknown field" if kind == "extra_forbidden" else error.get("msg", "invalid")
        parts.append(f"{field}: {message}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every refusal into the answer described above."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _answer(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> Response:
        for cls, status, code in _STORE_ERRORS:
            if isinstance(exc, cls):
                return _answer(request, status, code, str(exc))
        raise AssertionError("StoreError is in _STORE_ERRORS")  # pragma: no cover

    @app.exception_handler(KeystoreUnavailable)
    async def _unavailable(request: Request, exc: KeystoreUnavailable) -> Response:
        log.warning("keystore unavailable: %s", exc)
        return _answer(request, 503, "unavailable", "the keystore is unavailable; try again shortly",
                       {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return _answer(request, 400, "invalid", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "invalid" if exc.status_code < 500 else "internal")
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(exc.detail)
        return _answer(request, exc.status_code, code, message, exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        # the path without its query string (limits.loggable: a pasted token cut short),
        # the exception with its traceback (tokens travel in a header, key secrets only in
        # responses)
        log.error("internal error at %s %s", request.method, loggable(request.url.path), exc_info=exc)
        return _answer(request, 500, "internal", "internal error; the server's log has the details")
