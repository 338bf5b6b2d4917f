"""The seam between the queue and the network: a Courier delivers one message.

The queue only sees per-recipient outcomes already classified as sent, deferred
(temporary: retry later) or failed (permanent), so adding MX delivery or another provider
kind means writing one more Courier, nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from relay.delivery.replytext import clean

if TYPE_CHECKING:
    from relay.queue.model import Body

__all__ = ["Courier", "Outcome", "Status"]


class Status(enum.StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one recipient in one attempt. `reply` is cleaned on the way in
    (relay/delivery/replytext.py): whatever a remote server sent, an Outcome's reply is one
    printable line of bounded length, safe for the spool, the log and a DSN.

    `session_failed`: the upstream itself could not be used (connect, TLS, greeting, EHLO,
    STARTTLS, AUTH; see errors.session_trouble), which provider health counts against it
    (relay/delivery/health.py); a verdict on recipients or on the sender never is."""

    status: Status
    reply: str
    session_failed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reply", clean(self.reply))


class Courier(Protocol):
    name: str
    max_connections: int

    async def deliver(self, mail_from: str, recipients: list[str], body: Body) -> dict[str, Outcome]:
        """Try once; return one Outcome per recipient. Must not raise for network faults."""
        ...

    async def close(self) -> None: ...
