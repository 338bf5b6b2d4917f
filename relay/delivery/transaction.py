"""One SMTP mail transaction on an open aiosmtplib session: MAIL, RCPT per recipient, DATA.

Shared by the smarthost and MX couriers so both classify replies the same way
(relay/delivery/errors.py). It never loses what it learnt: if the connection breaks
after some recipients were refused, those keep their verdict and only the undecided ones
are deferred.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiosmtplib

from relay.delivery.courier import Outcome, Status
from relay.delivery.errors import outcome_for_exception, outcome_for_reply, session_trouble
from relay.internals import data_in_chunks

if TYPE_CHECKING:
    from relay.queue.model import Body

__all__ = ["Result", "SenderRefused", "transaction"]


class SenderRefused(Exception):
    """MAIL FROM was refused or the connection failed before it was accepted: nothing of
    the message reached the upstream, so the caller may try elsewhere (or a fresh
    connection). `outcome` is the deferral to record if it does not."""

    def __init__(self, outcome: Outcome, *, connection_lost: bool) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome
        self.connection_lost = connection_lost


@dataclass(slots=True)
class Result:
    outcomes: dict[str, Outcome]
    reusable: bool  # the session is clean and may carry the next message


async def transaction(
    client: aiosmtplib.SMTP, upstream: str, mail_from: str, rcpts: list[str], body: Body,
) -> Result:
    options = []
    if client.supports_extension("size"):
        options.append(f"SIZE={len(body)}")
    # a spooled body is not scanned for 8-bit bytes: BODY=8BITMIME is allowed on 7-bit
    # content too (RFC 6152), and a big message is what most likely carries some
    if (not isinstance(body, bytes) or not body.isascii()) and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    try:
        await client.mail(mail_from, options=options)
    except ValueError as exc:  # aiosmtplib refused the address itself: no server will take it
        return Result(dict.fromkeys(rcpts, outcome_for_exception(exc, upstream)), await _reset(client))
    except aiosmtplib.SMTPResponseException as exc:
        # a 421 (or a RSET that fails) leaves no session: on a pooled connection that is a
        # stale connection, worth one fresh try, rather than the provider's verdict
        live = await _reset(client)
        raise SenderRefused(session_trouble(upstream, exc), connection_lost=not live) from None
    except Exception as exc:  # noqa: BLE001 - the connection failed before anything was sent
        client.close()
        raise SenderRefused(session_trouble(upstream, exc), connection_lost=True) from None
    outcomes: dict[str, Outcome] = {}
    try:
        for rcpt in rcpts:
            try:
                await client.rcpt(rcpt)
            except (aiosmtplib.SMTPRecipientRefused, ValueError) as exc:
                outcomes[rcpt] = outcome_for_exception(exc, upstream)
        accepted = [rcpt for rcpt in rcpts if rcpt not in outcomes]
        if not accepted:
            return Result(outcomes, await _reset(client))
        try:
            if isinstance(body, bytes):
                response = await client.data(body)
            else:  # a big message: sent as it is read from the spool
                response = await data_in_chunks(client, body.chunks(), timeout=client.timeout)
        except aiosmtplib.SMTPDataError as exc:  # refused at DATA or at its end: RSET to reuse
            if exc.code < 400:  # a 2xx/3xx where 354 (or the final 250) was due: no delivery
                return Result(_out_of_step(outcomes, accepted, upstream, exc), _dropped(client))
            outcomes.update(dict.fromkeys(accepted, outcome_for_reply(exc.code, exc.message)))
            return Result(outcomes, await _reset(client))
        outcomes.update(dict.fromkeys(accepted, outcome_for_reply(response.code, response.message)))
        return Result(outcomes, client.is_connected)
    except Exception as exc:  # noqa: BLE001 - connection lost or timed out mid-transaction
        client.close()
        trouble = outcome_for_exception(exc, upstream)
        if trouble.status is not Status.DEFERRED:
            trouble = Outcome(Status.DEFERRED, f"451 4.4.2 {upstream}: {trouble.reply}")
        for rcpt in rcpts:
            outcomes.setdefault(rcpt, trouble)
        return Result(outcomes, False)
    except asyncio.CancelledError:  # shutdown mid-transaction: the session is unusable
        client.close()
        raise


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """RSET after a refused transaction, so the session can be reused; False if it broke."""
    try:
        await client.rset()
    except Exception:  # noqa: BLE001 - a session that cannot RSET is simply not reused
        client.close()
        return False
    return client.is_connected


def _out_of_step(
    outcomes: dict[str, Outcome], accepted: list[str], upstream: str, exc: aiosmtplib.SMTPDataError,
) -> dict[str, Outcome]:
    """aiosmtplib raises SMTPDataError for any reply to DATA but 354, and for any final
    reply but 250: a 2xx or 3xx there (a broken upstream, or one that means something
    else) said nothing of the message being taken. Deferred, never "sent": a retry may duplicate a
    message, but must not lose one."""
    trouble = Outcome(Status.DEFERRED, f"451 4.5.0 {upstream} answered DATA out of sequence: "
                                       f"{exc.code} {exc.message}")
    return outcomes | dict.fromkeys(accepted, trouble)


def _dropped(client: aiosmtplib.SMTP) -> bool:
    """Close a session whose state is unknown (the upstream may still be reading a message
    into which a RSET and the next transaction would go); never reused."""
    client.close()
    return False
