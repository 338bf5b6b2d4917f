"""Turning what an upstream did into sent / deferred / failed, in one place.

Two rules:
  * Only a recipient-level 5xx (to RCPT, or the final reply to DATA) fails a recipient.
    A refusal of the session itself (greeting, EHLO, STARTTLS, AUTH, MAIL FROM) says
    something about the provider, not the mail: it defers, so a failover group tries its
    next member and the message waits out a provider's bad day instead of bouncing.
  * Anything we cannot classify is temporary (maddy's rule). A surprise must lead to a
    retry, never to a bounce of mail we promised to deliver.
"""

from __future__ import annotations

import ssl

import aiosmtplib

from relay.delivery.courier import Outcome, Status

__all__ = ["outcome_for_exception", "outcome_for_reply", "session_trouble", "stage_of"]


def outcome_for_reply(code: int, message: str) -> Outcome:
    """A reply to RCPT or the final reply to DATA: 2xx sent, 5xx failed, else deferred."""
    text = f"{code} {message}".strip()
    if 200 <= code < 300:
        return Outcome(Status.SENT, text)
    if 500 <= code < 600:
        return Outcome(Status.FAILED, text)
    return Outcome(Status.DEFERRED, text)


def outcome_for_exception(exc: BaseException, upstream: str = "upstream") -> Outcome:
    """A fault raised while talking to `upstream` about recipients (RCPT, DATA)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return outcome_for_reply(exc.code, exc.message)
    if isinstance(exc, ssl.SSLError):  # before ValueError: certificate errors are ValueErrors too
        return Outcome(Status.DEFERRED, f"451 4.7.5 TLS with {upstream} failed: {exc}")
    if isinstance(exc, ValueError):  # aiosmtplib refuses control characters in addresses
        return Outcome(Status.FAILED, f"550 5.1.3 invalid address: {exc}")
    if isinstance(exc, TimeoutError):
        return Outcome(Status.DEFERRED, f"451 4.4.2 {upstream} timed out")
    if isinstance(exc, (ConnectionError, OSError, aiosmtplib.SMTPException)):
        return Outcome(Status.DEFERRED, f"451 4.4.1 {upstream} unreachable: {exc}")
    return Outcome(Status.DEFERRED, f"451 4.3.0 unexpected delivery error with {upstream}: {exc!r}")


def stage_of(exc: BaseException) -> str:
    """Which step of opening a session an aiosmtplib exception comes from."""
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        return "greeting"
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return "EHLO"
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return "AUTH"
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return "MAIL FROM"
    return "STARTTLS"  # the only other reply aiosmtplib's connect() checks


def session_trouble(upstream: str, exc: BaseException) -> Outcome:
    """Connecting, greeting, EHLO, STARTTLS, AUTH or MAIL FROM went wrong at `upstream`: a
    fault of the provider (or of our account there), never of the recipients, so it
    defers whatever the reply code was, and the reply says who refused what.

    The outcome is marked `session_failed` (provider health counts it) unless it is a
    reply to MAIL FROM other than 421: a provider refusing one sender (an unverified
    sender domain, a suspended sub-account) still serves the others, and marking it down
    would hold back everyone's mail for one sender's problem. A 421 or a lost connection
    there is the provider closing the channel, like a refused greeting."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"{exc.code} {exc.message}".strip()
        session = not isinstance(exc, aiosmtplib.SMTPSenderRefused) or exc.code == 421
        return Outcome(Status.DEFERRED, f"451 4.4.0 {upstream} refused {stage_of(exc)}: {reply}",
                       session_failed=session)
    outcome = outcome_for_exception(exc, upstream)
    if outcome.status is Status.FAILED:  # a local address check: still not the provider's verdict
        return Outcome(Status.DEFERRED, f"451 4.4.0 {upstream}: {outcome.reply}")
    return Outcome(outcome.status, outcome.reply, session_failed=True)
