"""The seam between the queue and the network: a Courier delivers one message.

The engine only sees per-recipient outcomes already classified as sent, deferred
(temporary: retry later) or failed (permanent), so adding MX delivery or another provider
kind means writing one more Courier, nothing else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Courier", "Outcome", "Status"]


class Status(enum.StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    reply: str


class Courier(Protocol):
    name: str

    async def deliver(self, mail_from: str, recipients: list[str], body: bytes) -> dict[str, Outcome]:
        """Try once; return one Outcome per recipient. Must not raise for network faults."""
        ...

    async def close(self) -> None: ...
