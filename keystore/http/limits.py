"""The bounds of what the API and the console take and show, and log lines a client
cannot forge.

Numbers and times arrive as text or JSON (where `1e400`, `Infinity` and `NaN` are
numbers too). The keystore stores what it is given: an integer past SQLite's 64 bits
is an OverflowError there, and a time past the year 9999 (a rotation grace of
"99999999w", an expiry at 9999-12-31T23:59-05:00) is written and then breaks every answer
that shows the key (its ISO time cannot be made), so one write would turn the key list
into a 500 for everyone. So the HTTP side refuses them with a 400 naming the field, and
shows a stored time it cannot format (written by an older version, or by the CLI) as the
latest time it can rather than failing the page.

A request path is percent-decoded (`%0a` is a newline) and may hold whatever a client put
there, a pasted admin token included: `loggable` is what the logs get of it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from keystore import keys
from keystore.store import StoreError

__all__ = ["LATEST", "MAX_GRACE", "MAX_INT", "check_grace", "check_time", "clamp_time", "loggable"]

MAX_INT = 2**63 - 1  # SQLite's INTEGER
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # the last time ISO 8601 writes
MAX_GRACE = 3650 * 86400.0  # a rotation grace of ten years is already no rotation at all


def check_grace(seconds: float) -> float:
    """`seconds` if it is a rotation grace the keystore can hold, else StoreError (400)."""
    if not math.isfinite(seconds) or seconds > MAX_GRACE:
        raise StoreError(f"grace: at most {MAX_GRACE / 86400:.0f}d")
    return seconds


def check_time(at: float | None, field: str) -> float | None:
    """`at` (seconds since the epoch) if it is at the latest 9999-12-31 23:59:59 UTC."""
    if at is not None and not at <= LATEST:
        raise StoreError(f"{field}: at the latest 9999-12-31T23:59:59Z")
    return at


def clamp_time(at: float) -> float:
    """A stored time as one that can be shown: past the year 9999 (or not a number), the
    latest there is; before 1970, 1970."""
    if math.isnan(at):
        return LATEST
    return min(max(at, 0.0), LATEST)


def loggable(text: str) -> str:
    """`text` for a log line: the secret of anything key-shaped cut off (keys.redact_keys)
    and every character that is not printable (a newline, an escape sequence) written as
    its escape, so one request makes one line that says what it is."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in keys.redact_keys(text))
