"""Session policy: who may send as whom, how much, and what a message must look like.

Pure functions and small stateful limiters, no I/O, so each rule is testable alone and
the SMTP handler stays glue.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

from keystore.models import Identity, canonical_address
from relay import replies

__all__ = [
    "HeaderInfo",
    "RateLimiter",
    "check_headers",
    "deliverable_address",
    "has_bare_line_ending",
    "missing_headers",
    "received_header",
    "sender_allowed",
]

_HEADER_PARSER = BytesHeaderParser(policy=compat32)
_PRINTABLE_ADDRESS = re.compile(r"[^\x00-\x20\x7f]+")
# The EHLO argument is the client's; aiosmtpd ends a command line at LF only, so it can hold
# a bare CR, which would start a new header line (e.g. a forged From:) in the trace header.
_NOT_IN_TRACE = re.compile(r"[^\x21-\x7e]")
# A header line is a field ("Name:", RFC 5322 ftext) or a folded continuation. Anything else
# ("From : x", a stray line) is read differently by different parsers: ours may skip a From:
# that the recipient's software shows.
_FIELD_OR_FOLD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:|[ \t]")


def sender_allowed(identity: Identity, address: str) -> bool:
    """The envelope or header sender must be the mailbox or one of its aliases."""
    wanted = canonical_address(address)
    return wanted == identity.mailbox or wanted in identity.aliases


def deliverable_address(address: str) -> bool:
    """local@domain with no control characters or spaces (an upstream would refuse it
    later, turning a syntax error the client could fix into a bounce)."""
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and _PRINTABLE_ADDRESS.fullmatch(address) is not None


def has_bare_line_ending(content: bytes) -> bool:
    """True if any CR or LF is not part of a CRLF pair (the SMTP smuggling vector)."""
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


@dataclass(frozen=True, slots=True)
class HeaderInfo:
    """What the client left out, for `missing_headers`."""

    has_date: bool
    has_message_id: bool


def check_headers(identity: Identity, content: bytes, *, check_from: bool) -> HeaderInfo | str:
    """Parse the header block; return what is missing, or the reply refusing the message."""
    end = content.find(b"\r\n\r\n")
    block = content if end < 0 else content[: end + 2]
    headers = _HEADER_PARSER.parsebytes(block)
    if check_from:
        senders = headers.get_all("From", []) + headers.get_all("Sender", [])
        if not headers.get_all("From"):
            return replies.NO_FROM_HEADER
        lines = block.split(b"\r\n")[:-1]
        if lines[0][:1] in (b" ", b"\t") or not all(_FIELD_OR_FOLD.match(line) for line in lines):
            return replies.HEADER_MALFORMED
        for _, address in email.utils.getaddresses([str(s) for s in senders]):
            if not address or not sender_allowed(identity, address):
                return replies.HEADER_FROM_NOT_OWNED
    return HeaderInfo("Date" in headers, "Message-ID" in headers)


def _rfc5322_date(when: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(when, UTC))


def received_header(
    *, helo: str, client_ip: str, hostname: str, queue_id: str, tls: str, key_id: str, when: float
) -> bytes:
    """RFC 5321 section 4.4 trace header; ESMTPSA = ESMTP + TLS + AUTH (RFC 3848).

    Names the key id (never its secret) so an operator can tell which tool sent a message.
    """
    date = _rfc5322_date(when)
    helo = _NOT_IN_TRACE.sub("?", helo)
    return (
        f"Received: from {helo} ([{client_ip}])\r\n"
        f"\tby {hostname} (keyrelay) with ESMTPSA id {queue_id}\r\n"
        f"\t({tls}) (auth key {key_id});\r\n"
        f"\t{date}\r\n"
    ).encode("utf-8", "replace")


def missing_headers(info: HeaderInfo, *, hostname: str, queue_id: str, when: float) -> bytes:
    """Date and Message-ID a submission server adds when the client left them out
    (RFC 6409 sections 8.2 and 8.3)."""
    added = b""
    if not info.has_date:
        added += f"Date: {_rfc5322_date(when)}\r\n".encode()
    if not info.has_message_id:
        added += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode()
    return added


class RateLimiter:
    """Token bucket per key: `per_minute` messages, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key_id: str, per_minute: int | None = None) -> bool:
        rate = per_minute if per_minute is not None else self.per_minute
        if rate <= 0:
            return True
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key_id, (float(rate), now))
        tokens = min(float(rate), tokens + (now - stamp) * rate / 60.0)
        if tokens < 1.0:
            self._buckets[key_id] = (tokens, now)
            return False
        self._buckets[key_id] = (tokens - 1.0, now)
        return True
