"""Delivery status notifications (RFC 3464) for recipients that failed for good.

One DSN per failed attempt batch, to the envelope sender (the mailbox), with a line per
failed recipient and the remote reply, and the original headers attached. A DSN is sent
with the null sender, so it can never itself be bounced (RFC 5321 section 4.5.5).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from datetime import UTC, datetime

__all__ = ["build_dsn"]

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def _status(reply: str) -> str:
    match = _ENHANCED.search(reply)
    return match.group(0) if match else "5.0.0"


def _date(when: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(when, UTC))


def build_dsn(
    *, original: bytes, mail_from: str, queue_id: str, arrival: float,
    failures: list[tuple[str, str]], hostname: str, now: float,
) -> bytes:
    """The whole DSN message (CRLF line endings) for `failures` = [(recipient, reply)]."""
    boundary = f"dsn-{secrets.token_hex(12)}"
    end = original.find(b"\r\n\r\n")
    headers = original if end < 0 else original[: end + 2]
    lines = "\r\n".join(f"  <{rcpt}>: {reply}" for rcpt, reply in failures)
    human = (
        f"This is the mail system at {hostname}.\r\n\r\n"
        "Your message could not be delivered to one or more recipients.\r\n"
        "It will not be retried. The replies were:\r\n\r\n"
        f"{lines}\r\n"
    )
    per_recipient = "".join(
        f"\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\nStatus: {_status(reply)}\r\n"
        f"Diagnostic-Code: smtp; {reply}\r\n"
        for rcpt, reply in failures
    )
    status = (
        f"Reporting-MTA: dns; {hostname}\r\nX-Queue-ID: {queue_id}\r\n"
        f"Arrival-Date: {_date(arrival)}\r\n{per_recipient}"
    )
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{mail_from}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {_date(now)}\r\n"
        f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(4)}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
    )
    return (
        head.encode()
        + f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{human}\r\n".encode()
        + f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n{status}\r\n".encode()
        + f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode()
        + headers
        + f"\r\n--{boundary}--\r\n".encode()
    )
