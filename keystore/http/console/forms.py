"""Reading the console's form fields into the service's arguments.

What a person types arrives as text; a field they cannot get right answers a StoreError
naming the field (shown on the form again, 400), never a 500. An empty field means "not
set" (and, when editing a key, "clear it").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from keystore.http.limits import MAX_INT, check_grace, clamp_time
from keystore.models import AuthKey
from keystore.store import StoreError

__all__ = ["KeyForm", "expiry_text", "grace_seconds", "networks_text"]

_SPLIT = re.compile(r"[\s,]+")
# The same forms as the CLI's durations (relay.config.parse_duration; keystore/http does
# not import the relay package): plain seconds or a number with s, m, h or d.
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_FIELD = 2000  # characters; a note longer than this is a paste gone wrong


def _text(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    text = value.strip() if isinstance(value, str) else ""
    if len(text) > MAX_FIELD:
        raise StoreError(f"{name}: at most {MAX_FIELD} characters")
    return text


def _expiry(text: str) -> float | None:
    """A date (YYYY-MM-DD, what <input type=date> sends): the key stops working at 00:00
    UTC that day, as `keystore key create --expires DATE`."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise StoreError(f"expiry: {text!r} is not a date (YYYY-MM-DD)") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _rate_limit(text: str) -> int | None:
    if not text:
        return None
    # isdecimal, not isdigit: "²" is a digit int() refuses
    if not text.isdecimal() or int(text) > MAX_INT:
        raise StoreError(f"rate limit: {text!r} is not a whole number of messages per minute")
    return int(text)


def _networks(text: str) -> list[str]:
    return [part for part in _SPLIT.split(text) if part]


def networks_text(key: AuthKey) -> str:
    return "\n".join(key.allow_from)


def expiry_text(key: AuthKey) -> str:
    """The edit form's value for the key's expiry (a date, as the field takes it)."""
    if key.expires is None:
        return ""
    return datetime.fromtimestamp(clamp_time(key.expires), UTC).date().isoformat()


def grace_seconds(form: Mapping[str, object]) -> float:
    """The rotation grace: "0", "90s", "15m", "24h", "7d"; empty means none."""
    text = _text(form, "grace")
    if not text:
        return 0.0
    match = _DURATION.match(text.lower())
    if not match:
        raise StoreError(f"grace: {text!r} is not a duration (e.g. 0, 90s, 15m, 24h, 7d)")
    return check_grace(float(match.group(1)) * _UNIT[match.group(2)])


@dataclass(frozen=True, slots=True)
class KeyForm:
    """The settings of the create and edit forms, as typed."""

    owner: str | None
    note: str | None
    route: str | None
    rate_limit: int | None
    expires: float | None
    allow_from: list[str]

    @classmethod
    def read(cls, form: Mapping[str, object]) -> KeyForm:
        return cls(
            owner=_text(form, "owner") or None,
            note=_text(form, "note") or None,
            route=_text(form, "route") or None,
            rate_limit=_rate_limit(_text(form, "rate_limit")),
            expires=_expiry(_text(form, "expires")),
            allow_from=_networks(_text(form, "allow_from")),
        )

    def changes_from(self, key: AuthKey, form: Mapping[str, object]) -> dict[str, object]:
        """What differs from the key as it is (only those go to update_key, so the audit
        entry names what changed). The expiry counts as changed only when the date does:
        a key created with a time of day keeps it when the form is saved unchanged."""
        changes: dict[str, object] = {}
        for name in ("owner", "note", "route", "rate_limit"):
            if getattr(self, name) != getattr(key, name):
                changes[name] = getattr(self, name)
        if _text(form, "expires") != expiry_text(key):
            changes["expires"] = self.expires
        if self.allow_from != list(key.allow_from):
            changes["allow_from"] = self.allow_from or None
        return changes
