"""Logging in with an admin token, and out.

The login form is the only one without a session, so its CSRF token is double-submitted:
GET /login sets a random value in a cookie and in the form, POST /login wants both equal.
The token pasted goes through the app's TokenLogins, the same brake as the API's bearer
tokens (failures per client network, Throttled past the budget), and every refusal reads
the same whatever was wrong with the token.
"""

from __future__ import annotations

import math
import secrets

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from keystore.http.auth import Throttled, Unauthorized
from keystore.http.console import csrf
from keystore.http.console.pages import posted, sessions_of
from keystore.http.console.render import page
from keystore.http.console.session import COOKIE, PRELOGIN_COOKIE

__all__ = ["cookie", "router"]

router = APIRouter(include_in_schema=False)
PRELOGIN_TTL = 3600  # seconds a login form stays usable


def cookie(name: str, value: str, *, max_age: int, secure: bool) -> str:
    """A Set-Cookie value: HttpOnly (no script reads it), SameSite=Strict (no other site's
    page sends it), Path=/, and Secure when the console is served over HTTPS."""
    parts = [f"{name}={value}", "HttpOnly", "SameSite=Strict", "Path=/", f"Max-Age={max_age}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _login_page(request: Request, *, status: int = 200, error: str | None = None,
                retry_after: int | None = None) -> Response:
    nonce = secrets.token_urlsafe(32)
    response = page(request, "login.html", status, login_csrf=nonce, error=error)
    response.headers.append("set-cookie", cookie(PRELOGIN_COOKIE, nonce, max_age=PRELOGIN_TTL,
                                                 secure=request.app.state.site.secure_cookies))
    if retry_after is not None:
        response.headers["retry-after"] = str(retry_after)
    return response


@router.get("/login")
async def login_form(request: Request) -> Response:
    if sessions_of(request).get(request.cookies.get(COOKIE)) is not None:
        return RedirectResponse("/", status_code=303)
    return _login_page(request)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    csrf.check(request.cookies.get(PRELOGIN_COOKIE, ""), form.get(csrf.FIELD))
    presented = str(form.get("token") or "").strip()
    client = request.client.host if request.client else ""
    try:
        actor = await request.app.state.logins.login(presented, client)
    except Throttled as exc:
        retry = max(1, int(exc.retry_after + 0.999))
        return _login_page(request, status=429, retry_after=retry,
                           error=f"Too many failed logins from your address; try again in {retry} s.")
    except Unauthorized:
        return _login_page(request, status=401, error="That admin token was not accepted.")
    if actor.token_id is None:  # an Actor that is no token's cannot hold a session
        return _login_page(request, status=401, error="That admin token was not accepted.")
    site = request.app.state.site
    sessions = sessions_of(request)
    # a login replaces the session this browser held (a second tab's login form): the old
    # one ends now rather than living on, unseen, until its time is up
    sessions.end(request.cookies.get(COOKIE) or "")
    session = sessions.create(actor.token_id)
    response = RedirectResponse("/", status_code=303)
    # the browser may keep it up to a second longer (Max-Age is whole seconds); the
    # session ends on time here whatever the cookie says
    response.headers.append("set-cookie", cookie(COOKIE, session.id, max_age=math.ceil(site.session_ttl),
                                                 secure=site.secure_cookies))
    response.headers.append("set-cookie", cookie(PRELOGIN_COOKIE, "", max_age=0, secure=site.secure_cookies))
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    console, _ = await posted(request)
    sessions_of(request).end(console.session.id)
    response = RedirectResponse("/login", status_code=303)
    response.headers.append("set-cookie", cookie(COOKIE, "", max_age=0,
                                                 secure=request.app.state.site.secure_cookies))
    return response
