"""Delivery status notifications (RFC 3464) for recipients that failed for good, built with
the stdlib `email` package as a multipart/report.

One DSN per attempt that failed recipients, to the envelope sender (the mailbox): a
human-readable part, a message/delivery-status part with a block per failed recipient,
and the original headers (text/rfc822-headers). It is sent with the null sender, so it
can never itself be bounced (RFC 5321 section 4.5.5).

The remote replies quoted here were cleaned when they were received
(relay/delivery/replytext.py); the delivery-status fields are kept to ASCII besides
(RFC 3464 fields are ASCII; anything else becomes "?"), and the human part is
quoted-printable, so a DSN is 7-bit whatever a provider said.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message, MIMEPart

__all__ = ["build_dsn"]

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_POLICY = policy.SMTP.clone(max_line_length=78)  # CRLF line endings, as the message goes out


def _status(reply: str) -> str:
    """The enhanced status code of a failure (RFC 3463); 5.0.0 when the reply has none."""
    match = _ENHANCED.search(reply)
    if match is None or match.group(1) != "5":
        return "5.0.0"
    return match.group(0)


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _date(when: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(when, UTC))


def _fields(pairs: list[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in pairs:
        block[name] = _ascii(value)
    return block


def build_dsn(
    *, original: bytes, mail_from: str, queue_id: str, arrival: float,
    failures: list[tuple[str, str]], hostname: str, now: float,
) -> bytes:
    """The whole DSN message (CRLF line endings) for `failures` = [(recipient, reply)]."""
    dsn = EmailMessage(policy=_POLICY)
    dsn["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    dsn["To"] = f"<{mail_from}>"
    dsn["Subject"] = "Undelivered Mail Returned to Sender"
    dsn["Date"] = _date(now)
    dsn["Message-ID"] = f"<{queue_id}.dsn.{secrets.token_hex(4)}@{hostname}>"
    dsn["Auto-Submitted"] = "auto-replied"
    lines = "\n".join(f"  <{rcpt}>: {reply}" for rcpt, reply in failures)
    dsn.set_content(
        f"This is the mail system at {hostname}.\n\n"
        "Your message could not be delivered to one or more recipients.\n"
        f"It will not be retried. The replies were:\n\n{lines}\n",
        cte="quoted-printable",
    )
    dsn.make_mixed()
    dsn.set_type("multipart/report")
    dsn.set_param("report-type", "delivery-status")

    status = MIMEPart(policy=_POLICY)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload([
        _fields([("Reporting-MTA", f"dns; {hostname}"), ("X-Queue-ID", queue_id),
                 ("Arrival-Date", _date(arrival))]),
        *(_fields([("Final-Recipient", f"rfc822; {rcpt}"), ("Action", "failed"),
                   ("Status", _status(reply)), ("Diagnostic-Code", f"smtp; {reply}")])
          for rcpt, reply in failures),
    ])
    dsn.attach(status)

    end = original.find(b"\r\n\r\n")
    headers = original if end < 0 else original[: end + 2]
    returned = MIMEPart(policy=_POLICY)
    returned.set_content(headers, "text", "rfc822-headers", cte="7bit" if headers.isascii() else "8bit")
    dsn.attach(returned)
    return dsn.as_bytes()
