"""Session policy: who may send as whom, how much, and what a message must look like.

Pure functions and small stateful limiters, no I/O, so each rule is testable alone and
the SMTP handler stays glue.
"""

from __future__ import annotations

import email.utils
import re
import time
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import Header, decode_header
from email.parser import BytesHeaderParser
from email.policy import compat32

from keystore.models import Identity, canonical_address
from relay import replies

__all__ = [
    "HeaderInfo",
    "RateLimiter",
    "check_headers",
    "deliverable_address",
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
# What a reader could take for an address anywhere in a sender field (display name,
# comment, the address itself) is a word between these separators with text on both sides
# of an "@". Split, not searched for: a search for text@text backtracks quadratically
# over a long run of text without an "@".
_WORD_SEPARATORS = re.compile(r"[\s<>()\[\]\",;:\\]+")
_AROUND_ADDRESS = "'.!?"  # "Write to 'me@example.com'!": quotes and punctuation around it
_FOLD = re.compile(r"\r\n(?=[ \t])")
# Sender fields, each group with the reply that refuses it. Every one names who sent the
# message to a reader, so each must be the authenticated mailbox or an alias.
_SENDER_FIELDS = (
    (("From", "Sender"), replies.HEADER_FROM_NOT_OWNED, replies.HEADER_FROM_NAME_NOT_OWNED),
    (("Resent-From", "Resent-Sender"), replies.HEADER_RESENT_NOT_OWNED, replies.HEADER_RESENT_NOT_OWNED),
)


def sender_allowed(identity: Identity, address: str) -> bool:
    """The envelope or header sender must be the mailbox or one of its aliases."""
    wanted = canonical_address(address)
    return wanted == identity.mailbox or wanted in identity.aliases


def deliverable_address(address: str) -> bool:
    """local@domain with no control characters or spaces (an upstream would refuse it
    later, turning a syntax error the client could fix into a bounce)."""
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and _PRINTABLE_ADDRESS.fullmatch(address) is not None


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
        if not headers.get_all("From"):
            return replies.NO_FROM_HEADER
        lines = block.split(b"\r\n")[:-1]
        if lines[0][:1] in (b" ", b"\t") or not all(_FIELD_OR_FOLD.match(line) for line in lines):
            return replies.HEADER_MALFORMED
        for names, not_owned, name_not_owned in _SENDER_FIELDS:
            fields = [_field_text(v) for name in names for v in headers.get_all(name, [])]
            for field in fields:  # an empty field names nobody the reader could check
                try:
                    addresses = email.utils.getaddresses([field])
                except RecursionError:  # comments nested thousands deep: no sender we can tell
                    return not_owned
                if not addresses or not all(a and sender_allowed(identity, a) for _, a in addresses):
                    return not_owned
            for field in fields:
                shown = _shown_text(field)
                if shown is None:
                    return replies.HEADER_UNDECODABLE
                if not all(_shown_address_allowed(identity, w) for w in _WORD_SEPARATORS.split(shown)):
                    return name_not_owned
    return HeaderInfo("Date" in headers, "Message-ID" in headers)


def _shown_address_allowed(identity: Identity, word: str) -> bool:
    """A shown word is fine unless it reads as an address (text@text) that is not owned."""
    local, _, domain = word.strip(_AROUND_ADDRESS).partition("@")
    if not local or not domain:  # no "@", or "@handle", "name@": not an address
        return True
    return sender_allowed(identity, word) or sender_allowed(identity, word.strip(_AROUND_ADDRESS))


def _field_text(value: str | Header) -> str:
    """A field's text, unfolded (RFC 5322 2.2.3: getaddresses cuts a quoted display name
    at a fold). compat32 hands a field with 8-bit bytes back as a Header of "unknown-8bit"
    chunks; those bytes are most likely UTF-8 (RFC 6532), as readers assume."""
    if isinstance(value, Header):
        value = "".join(_chunk_text(chunk, charset) for chunk, charset in decode_header(value))
    return _FOLD.sub("", value)


def _shown_text(field: str) -> str | None:
    """The field as a mail reader may show it, so a forged address in it cannot hide: encoded
    words (RFC 2047) decoded wherever they are (some readers decode them inside quotes too),
    compatibility forms folded (NFKC: a fullwidth "＠" reads as "@"), invisible format
    characters (zero-width spaces, direction marks) dropped. None when an encoded word
    cannot be decoded: a lenient reader might still show something we did not check."""
    try:
        text = "".join(_chunk_text(chunk, charset) for chunk, charset in decode_header(field))
    except HeaderParseError:
        return None
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def _chunk_text(chunk: bytes | str, charset: str | None) -> str:
    if isinstance(chunk, str):
        return chunk
    if charset is None:  # decode_header's plain text beside encoded words: its own encoding
        return chunk.decode("raw-unicode-escape", "backslashreplace")
    try:
        return chunk.decode(charset, "replace")
    except LookupError:  # "unknown-8bit", a misspelt or RFC 2231 "utf-8*en" charset: readers guess UTF-8
        return chunk.decode("utf-8", "replace")


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
    """Token bucket per key: `per_minute` messages, refilled continuously. This relay's
    own (keystore/clusterlimits.py's SendRates); several relays on one PostgreSQL share
    keystore/pglimits.py's instead. Async like that one, though nothing here waits."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}

    async def allow(self, key_id: str, per_minute: int | None = None) -> bool:
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
