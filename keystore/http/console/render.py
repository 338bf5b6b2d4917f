"""Templates (Jinja2, autoescaped) and the few formatting rules the pages share."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from keystore.http.limits import clamp_time
from keystore.legacy import ACCEPTED
from keystore.models import ROTATION_DUE_AFTER, UNUSED_AFTER, AuthKey, review_flags

__all__ = ["ROTATION_DUE", "UNUSED", "badges", "error_page", "page", "segment"]

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
UNUSED = UNUSED_AFTER  # the "unused" badge: no use for 30 days (from creation if never used)
ROTATION_DUE = ROTATION_DUE_AFTER  # the "rotation due" badge: not rotated for 90 days


def when(at: float | None, never: str = "never") -> str:
    if at is None:
        return never
    return datetime.fromtimestamp(clamp_time(at), UTC).strftime("%Y-%m-%d %H:%M UTC")


def ago(at: float | None) -> str:
    """'3 days ago', 'in 2 hours': how far from now, roughly."""
    if at is None:
        return ""
    delta = time.time() - clamp_time(at)
    future = delta < 0
    delta = abs(delta)
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if delta >= size:
            count = int(delta // size)
            text = f"{count} {unit}{'s' if count != 1 else ''}"
            break
    else:
        return "just now"
    return f"in {text}" if future else f"{text} ago"


def badges(key: AuthKey, now: float | None = None) -> list[str]:
    """The key list's warnings, by the rules of `key list`'s FLAGS and the reports
    (models.review_flags)."""
    now = time.time() if now is None else now
    return [flag.replace("-", " ") for flag in review_flags(key, now)]


def scheme_name(scheme: str | None) -> str:
    """A legacy password's hash scheme as Dovecot (and so its operators) name it."""
    return ACCEPTED.get(scheme, scheme) if scheme else "unknown"


def segment(value: str) -> str:
    """A value (an address, a workspace name) as one URL path segment."""
    return quote(value, safe="@")


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every page: names, notes and owners are typed by people
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(when=when, ago=ago, seg=segment, scheme=scheme_name)
_env.globals.update(badges=badges)


def page(request: Request, template: str, status: int = 200, **context: object) -> HTMLResponse:
    """Render one page; `context` adds to what every page has (the session's actor,
    CSRF token and flash messages, put on request.state by the route)."""
    state = request.state
    values = {
        "actor": getattr(state, "actor", None),
        "csrf": getattr(state, "csrf", ""),
        "flash": getattr(state, "flash", []),
        "can_edit": getattr(state, "can_edit", False),
        "is_owner": getattr(state, "is_owner", False),
        "error": None,
        "query": request.query_params.get("q", ""),
        **context,
    }
    html = _env.get_template(template).render(values)
    return HTMLResponse(html, status_code=status)


_TITLES = {400: "Refused", 401: "Not logged in", 403: "Not allowed", 404: "Not found",
           405: "Not allowed", 409: "Refused", 413: "Too large", 429: "Too many attempts",
           503: "Try again shortly"}


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """A page that is only a refusal or an error: its title by status, the message in the
    refusal banner. errors.py shows its errors outside /api/ with this too."""
    return page(request, "error.html", status, title=_TITLES.get(status, "Something went wrong"),
                message=message)
