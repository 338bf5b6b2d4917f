"""Turning what an upstream did into sent / deferred / failed, in one place.

The rule (maddy's): anything we cannot classify is temporary. A surprise must lead to a
retry, never to a bounce of mail we promised to deliver.
"""

from __future__ import annotations

import ssl

import aiosmtplib

from relay.delivery.courier import Outcome, Status

__all__ = ["outcome_for_exception", "outcome_for_reply"]


def outcome_for_reply(code: int, message: str) -> Outcome:
    text = f"{code} {message}".strip()
    if 200 <= code < 300:
        return Outcome(Status.SENT, text)
    if 500 <= code < 600:
        return Outcome(Status.FAILED, text)
    return Outcome(Status.DEFERRED, text)


def outcome_for_exception(exc: BaseException) -> Outcome:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return outcome_for_reply(exc.code, exc.message)
    if isinstance(exc, ssl.SSLError):  # before ValueError: certificate errors are ValueErrors too
        return Outcome(Status.DEFERRED, f"451 4.7.5 TLS with the upstream failed: {exc}")
    if isinstance(exc, ValueError):  # aiosmtplib refuses control characters in addresses
        return Outcome(Status.FAILED, f"550 5.1.3 invalid address: {exc}")
    if isinstance(exc, TimeoutError):
        return Outcome(Status.DEFERRED, "451 4.4.2 upstream timed out")
    if isinstance(exc, (ConnectionError, OSError, aiosmtplib.SMTPException)):
        return Outcome(Status.DEFERRED, f"451 4.4.1 upstream unreachable: {exc}")
    return Outcome(Status.DEFERRED, f"451 4.3.0 unexpected delivery error: {exc!r}")
