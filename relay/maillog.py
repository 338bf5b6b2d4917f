"""The mail log: one line per event, for operators and for fail2ban-style filters.

Lines are `key=value` pairs on the `relay.mail` logger. Callers pass key ids and
addresses, but a username is whatever the client typed, and clients do type their key
there: anything in the key format is written `rak_<id>_…` (keys.redact_keys). The
KeyRedactor filter does the same for every other log line the relay writes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from keystore.keys import redact_keys

if TYPE_CHECKING:
    from relay.delivery.courier import Outcome
    from relay.queue.model import Delivery, QueueItem

__all__ = ["KeyRedactor", "attempt", "auth_failed", "auth_ok", "queued", "rejected"]

log = logging.getLogger("relay.mail")


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer)


def auth_ok(peer: object, username: str, key_id: str) -> None:
    log.info("auth ok client=%s mailbox=%s key=%s", _peer(peer), username, key_id)


def auth_failed(peer: object, username: str, reason: str) -> None:
    # username is what the client typed: it helps spot typos, but may be a key (swapped fields)
    log.warning("auth failed client=%s username=%r reason=%s", _peer(peer), redact_keys(username[:256]),
                reason)


def rejected(peer: object, key_id: str | None, reply: str) -> None:
    log.info("rejected client=%s key=%s reply=%r", _peer(peer), key_id or "-", reply)


def queued(peer: object, item: QueueItem) -> None:
    if log.isEnabledFor(logging.INFO):
        log.info(
            "queued id=%s key=%s mailbox=%s from=<%s> rcpts=%d size=%d client=%s",
            item.id, item.key_id, item.mailbox, item.mail_from, len(item.recipients),
            len(item.body), _peer(peer),
        )


_ATTEMPT_WORDS = {"sent": "sent", "deferred": "deferred", "failed": "bounced"}


def attempt(item: Delivery, rcpt: str, upstream: str, outcome: Outcome, *, delay: float) -> None:
    """One line per recipient per attempt: sent, deferred (will retry) or bounced."""
    level = logging.INFO if outcome.status == "sent" else logging.WARNING
    if log.isEnabledFor(level):
        log.log(
            level,
            "%s id=%s key=%s mailbox=%s to=<%s> upstream=%s delay=%.3fs reply=%r",
            _ATTEMPT_WORDS[outcome.status], item.id, item.key_id, item.mailbox, rcpt, upstream, delay,
            outcome.reply,
        )


class KeyRedactor(logging.Filter):
    """On a log handler: every record leaves with key-shaped strings redacted, whichever
    library wrote it (aiosmtpd logs undecodable AUTH answers and unknown commands)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_keys(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_keys(record.exc_text)
        return True
