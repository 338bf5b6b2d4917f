"""Waiting for the relay to refuse an open session (a key revoked, suspended, narrowed or
rotated while the session is open): the refusal comes at the next MAIL FROM once the
recheck cache expires, or at the end of DATA when the change lands mid-message."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib

MESSAGE = b"From: alice@example.com\r\n\r\nhi\r\n"


async def refused_within(client: aiosmtplib.SMTP, seconds: float, *, sender: str = "alice@example.com",
                         message: bytes = MESSAGE) -> tuple[int, str, float]:
    """Send until the relay refuses: (code, text, seconds it took). At MAIL FROM (535, from
    the cached recheck) or at the end of DATA (554, which asks the keystore itself)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            await client.sendmail(sender, ["bob@example.net"], message)
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
            return exc.code, exc.message, time.monotonic() - started
        await asyncio.sleep(0.05)  # a pace, not a wait: each round is a real attempt
    raise AssertionError(f"still sending {seconds}s later")


async def mail_refused_within(client: aiosmtplib.SMTP, seconds: float, *,
                              sender: str = "alice@example.com") -> tuple[int, str]:
    """MAIL FROM (then RSET) until the relay refuses it: the check at MAIL itself."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            await client.mail(sender)
        except aiosmtplib.SMTPSenderRefused as exc:
            return exc.code, exc.message
        await client.rset()
        await asyncio.sleep(0.05)
    raise AssertionError(f"MAIL FROM still accepted {seconds}s later")
