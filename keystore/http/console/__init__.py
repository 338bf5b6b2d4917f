"""The web console of `keystore serve`: server-rendered pages over the AdminService.

`install(app)` adds its routes (everything outside /api/), its static files and its
response headers to the admin app. Pages are Jinja2 templates (keystore/http/templates),
usable without JavaScript; the one script (static/copy.js) is the copy button beside a
new secret. Modules:

* session.py: in-memory sessions bound to an admin token, re-checked on every request;
* csrf.py: the per-session token every form carries;
* headers.py: Content-Security-Policy and the other response headers;
* login.py: log in with an admin token (throttled like the API), log out;
* pages.py: workspaces, mailboxes, keys, the audit trail;
* forms.py, render.py: reading form fields, rendering templates.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from keystore.http.console import login, pages
from keystore.http.console.csrf import CsrfRefused
from keystore.http.console.headers import SecurityHeaders
from keystore.http.console.render import error_page, page
from keystore.http.console.session import COOKIE

__all__ = ["install"]

STATIC = Path(__file__).resolve().parent.parent / "static"


async def _to_login(request: Request, exc: Exception) -> Response:
    """No live session: to the login page, forgetting the dead cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.headers.append("set-cookie", login.cookie(COOKIE, "", max_age=0,
                                                       secure=request.app.state.site.secure_cookies))
    return response


async def _csrf_refused(request: Request, exc: Exception) -> Response:
    return page(request, "error.html", 403, title="Form refused",
                message="This form was not sent from this console's own page (its CSRF token is "
                        "missing or wrong); nothing was changed. Reload the page and try again.")


def install(app: FastAPI) -> None:
    # errors.py's answer outside /api/ (an unknown page, a refusal no route caught, a bug)
    app.state.error_page = error_page
    app.include_router(login.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_exception_handler(pages.LoginRequired, _to_login)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
    app.add_middleware(SecurityHeaders)
