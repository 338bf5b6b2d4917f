"""Making what a remote server says safe to keep, log and quote.

An upstream's reply is untrusted bytes: aiosmtplib decodes it with `surrogateescape`, so
one byte that is not UTF-8 (`550 unknown user caf\\xe9`) becomes a lone surrogate that
sqlite, `str.encode()` and the DSN builder refuse, and a CR, LF or escape sequence in it
could forge log lines or DSN fields. Every reply goes through `clean()` once, when its
Outcome is made (relay/delivery/courier.py), so nothing downstream has to think about it.
"""

from __future__ import annotations

import re

__all__ = ["MAX_REPLY", "clean"]

MAX_REPLY = 512  # characters kept of one reply; RFC 5321 allows 512 octets per reply line

_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # and runs of whitespace


def clean(text: str, limit: int = MAX_REPLY) -> str:
    """One line of printable text: bad bytes become U+FFFD, each run of control characters
    (CR, LF, ESC, ...) and whitespace a single space, and anything past `limit` characters
    an ellipsis."""
    if not text.isascii():
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text
