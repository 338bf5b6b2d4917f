"""Every SMTP reply the relay itself sends, with its RFC 3463 enhanced status code.

Keeping them in one table makes the wording a contract we can test, and `enhance()`
gives aiosmtpd's own bare replies ("503 Error: need RCPT command") the enhanced codes a
server advertising ENHANCEDSTATUSCODES owes its clients (RFC 2034).
"""

from __future__ import annotations

import re

__all__ = ["REASON_REPLIES", "enhance"]

# --- AUTH (RFC 4954)
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_AUTHZID = "535 5.7.8 Authorization identity must be empty or equal to the username"
AUTH_TOO_MANY = "421 4.7.0 Too many failed authentication attempts from your address, try later"
AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure, try again later"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"  # the same words as aiosmtpd's own
AUTH_CANNOT_SPLIT = "501 5.5.2 Can't split auth value"
AUTH_ABORTED = "501 5.7.0 Auth aborted"  # aiosmtpd's words, for a client's `*` (RFC 4954)
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication Exchange line is too long"  # RFC 4954 section 4

REASON_REPLIES = {
    "revoked": "535 5.7.8 Authentication credentials invalid: this auth key has been revoked",
    "disabled": "535 5.7.8 Authentication credentials invalid: this auth key is disabled",
    "expired": "535 5.7.8 Authentication credentials invalid: this auth key has expired",
    "suspended": "535 5.7.8 Authentication credentials invalid: this mailbox is suspended",
    "no_send_permission":
        "535 5.7.8 Authentication credentials invalid: this auth key lacks the email.send permission",
    # only for a session already logged in: its secret was rotated (no grace, or the grace ended)
    "rotated": "535 5.7.8 Authentication credentials invalid: this auth key's secret has been rotated",
    # the right secret from an address outside the key's allow-from networks
    "not_allowed_from":
        "535 5.7.8 Authentication credentials invalid: this auth key is not allowed from this address",
    # a legacy password (issue 13), right but no longer taken: revoked, disabled, or past the
    # deadline of `keystore legacy expire`; the client learns what to do instead
    "password_retired": "535 5.7.8 Authentication credentials invalid: password logins have ended "
                        "for this mailbox; use an auth key as the password",
    # only for a session already logged in: the legacy password was changed (a re-import)
    "password_changed": "535 5.7.8 Authentication credentials invalid: this mailbox's password has changed",
}

# --- MAIL / RCPT
MAIL_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
BAD_RECIPIENT = "553 5.1.3 Recipient address is not a deliverable local@domain address"
SENDER_NOT_OWNED = "553 5.7.1 Sender address is not the authenticated mailbox or one of its aliases"
NULL_SENDER = "553 5.7.1 A null sender is not allowed on submission"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients for one message"
RATE_LIMITED = "451 4.7.1 Sending rate limit for this auth key exceeded, try again later"
RATE_UNAVAILABLE = "451 4.3.0 Sending rate limit cannot be checked now, try again later"
KEYSTORE_DOWN_AT_MAIL = "451 4.7.0 Temporary authentication failure, try again later"

# --- DATA
BARE_LINE_ENDING = (
    "550 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
)
HEADER_FROM_NOT_OWNED = (
    "550 5.7.1 From: or Sender: header is not the authenticated mailbox or one of its aliases"
)
HEADER_FROM_NAME_NOT_OWNED = (
    "550 5.7.1 From: or Sender: header shows an address (in a display name or comment) that is not "
    "the authenticated mailbox or one of its aliases"
)
HEADER_RESENT_NOT_OWNED = (
    "550 5.7.1 Resent-From: or Resent-Sender: header is not the authenticated mailbox or one of its aliases"
)
HEADER_UNDECODABLE = "550 5.6.0 Message header has a sender field with an encoded word that cannot be decoded"
NO_FROM_HEADER = "550 5.6.0 Message has no From: header"
HEADER_MALFORMED = "550 5.6.0 Message header has a line that is not a header field"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
HEADER_TOO_BIG = "552 5.3.4 Message header block exceeds the fixed maximum of {limit} bytes"
LINE_TOO_LONG = "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
REVOKED_DURING_DATA = "554 5.7.8 Message refused: {reason}"
SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
SPOOL_ERROR = "451 4.3.0 Temporary server error, try again later"
QUEUED = "250 2.0.0 OK queued as {queue_id}"

# --- connection
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
TOO_MANY_COMMANDS = "421 4.7.0 Too many commands before authentication"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TLS_ALREADY_ACTIVE = "554 5.5.1 Error: TLS already active"  # Postfix's words
TLS_FAILED = "454 4.7.0 TLS not available due to temporary reason"  # RFC 3207; never seen: closed

# aiosmtpd's own replies without an enhanced code: code → the code to insert.
_BARE = re.compile(r"^(\d{3}) (?!\d\.\d{1,3}\.\d{1,3}(?: |$))")
_ENHANCED_FOR_CODE = {
    "221": "2.0.0", "252": "2.5.0", "454": "4.7.0", "500": "5.5.2", "501": "5.5.4",
    "502": "5.5.1", "503": "5.5.1", "530": "5.7.0", "552": "5.3.4", "554": "5.7.0",
    "555": "5.5.4",
}
# Texts replaced outright because the original is misleading or oddly worded.
_REWRITE = {
    "250 OK": "250 2.0.0 OK",
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "552 Error: Too much mail data": TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
}


def enhance(reply: str) -> str:
    """Add an enhanced status code to a bare aiosmtpd reply; leave everything else alone.

    The greeting and EHLO/HELO replies stay bare, as RFC 2034 section 3 requires.
    """
    rewritten = _REWRITE.get(reply)
    if rewritten is not None:
        return rewritten
    match = _BARE.match(reply)
    if match is None:
        return reply
    enhanced = _ENHANCED_FOR_CODE.get(match.group(1))
    if enhanced is None:
        return reply
    return f"{match.group(1)} {enhanced} {reply[4:]}"
