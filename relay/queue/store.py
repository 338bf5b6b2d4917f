"""What the queue needs from its storage, as a Protocol: one sqlite file
(relay/queue/sqlite.py), or PostgreSQL shared by several relays (relay/queue/postgres.py),
which implements the same methods; nothing above this line changes.

Every method is one transaction. `put()` returns only once the message is durable (the
relay answers 250 after it); `record()` writes all an attempt learnt at once.
"""

from __future__ import annotations

from typing import Protocol

from relay.queue.model import AttemptRecord, Change, Delivery, Fate, MessageInfo, NotDue, QueueItem

__all__ = ["QueueStore", "SpoolBusy", "SpoolError", "SpoolFull"]


class SpoolError(Exception):
    """The spool could not record a write; the client should retry later (451 4.3.0)."""


class SpoolFull(SpoolError):
    """The disk is full (452 4.3.1)."""


class SpoolBusy(Exception):
    """Another relay is running on this spool."""


class QueueStore(Protocol):
    async def close(self) -> None: ...

    # the relay's side
    async def put(self, item: QueueItem, *, claimed_by: str | None) -> None:
        """Store a new message durably, claimed by `claimed_by` (about to be delivered by it)."""

    async def claim(self, message_id: str, owner: str, now: float) -> Delivery | NotDue | None:
        """Claim a due, unclaimed message not on hold and read it; NotDue if it waits until
        later (the caller's timer was stale), None if it is gone, held or claimed."""

    async def load(self, message_id: str) -> Delivery | None:
        """Read a message this relay has claimed (a fresh one, claimed at put())."""

    async def note(self, message_id: str, outcomes: dict[str, tuple[str, str]]) -> None:
        """Store recipient outcomes before the attempt moves on to another upstream."""

    async def record(self, record: AttemptRecord) -> Fate:
        """Store an attempt's outcomes, bounce and schedule, and release the claim."""

    async def renew(self, owner: str) -> None:
        """Extend the lease of every claim `owner` holds (the running relay, every lease/3),
        so that only a node that died leaves its messages to the others; no-op where one
        relay owns the storage (sqlite)."""

    async def recover(self) -> None:
        """At start: release claims left by a relay that died; finish deletes it was asked for."""

    async def schedule(self, owner: str) -> list[tuple[float, str, str | None]]:
        """(next_attempt, id, route) of every message waiting: not on hold, and not claimed
        by anyone but `owner` (the scheduler skips those it is delivering)."""

    async def changed_elsewhere(self, since: int | None) -> tuple[bool, int]:
        """Whether another process changed the spool since `since` (`relay queue`; on a
        shared queue also another node's ended lease, or a node that stopped): the
        caller reads the schedule again."""

    async def count(self) -> int: ...

    # admin operations (`relay queue`, later the HTTP API)
    async def messages(self, message_id: str | None = None) -> list[MessageInfo]: ...

    async def body(self, message_id: str) -> bytes: ...

    async def retry(self, message_id: str) -> Change:
        """Make a message due now (MessageHeld if it is on hold)."""

    async def retry_all(self) -> int:
        """Make every message not on hold and not in flight due now; how many."""

    async def hold(self, message_id: str) -> Change: ...

    async def release(self, message_id: str) -> Change: ...

    async def delete(self, message_id: str) -> Change: ...
