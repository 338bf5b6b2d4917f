"""Waiting for the relay to refuse an open session (a key revoked, suspended, narrowed or
rotated while the session is open): the refusal comes at the next MAIL FROM once the
recheck cache expires, or at the end of DATA when the change lands mid-message."""

from __future__ import annotations

import time

import aiosmtplib

from tests.support.waiting import wait_until

MESSAGE = b"From: alice@example.com\r\n\r\nhi\r\n"


async def refused_within(client: aiosmtplib.SMTP, seconds: float, *, sender: str = "alice@example.com",
                         message: bytes = MESSAGE) -> tuple[int, str, float]:
    """Send until the relay refuses: (code, text, seconds it took). At MAIL FROM (535, from
    the cached recheck) or at the end of DATA (554, which asks the keystore itself)."""
    started = time.monotonic()
    refusal: list[tuple[int, str, float]] = []

    async def refused() -> bool:
        try:
            await client.sendmail(sender, ["bob@example.net"], message)
        except (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError) as exc:
            refusal.append((exc.code, exc.message, time.monotonic() - started))
        return bool(refusal)

    await wait_until(refused, seconds, "the relay to refuse a message on the open session")
    return refusal[0]


async def mail_refused_within(client: aiosmtplib.SMTP, seconds: float, *,
                              sender: str = "alice@example.com") -> tuple[int, str]:
    """MAIL FROM (then RSET) until the relay refuses it: the check at MAIL itself."""
    refusal: list[tuple[int, str]] = []

    async def refused() -> bool:
        try:
            await client.mail(sender)
        except aiosmtplib.SMTPSenderRefused as exc:
            refusal.append((exc.code, exc.message))
            return True
        await client.rset()
        return False

    await wait_until(refused, seconds, "the relay to refuse MAIL FROM on the open session")
    return refusal[0]
