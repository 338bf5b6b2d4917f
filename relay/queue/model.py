"""What the queue holds and hands out: plain dataclasses, no storage, no I/O.

A message's truth is its recipients' states. A recipient is `pending` until an attempt
decides it, then `sent` or `failed` for good; a failed recipient is `notified` once the
bounce naming it is stored. A message leaves the queue when no recipient is pending and
every failure is notified, so neither a delivery nor a bounce is ever repeated or lost.
"""

from __future__ import annotations

import enum
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "POISON_LIMIT",
    "AttemptRecord",
    "Body",
    "Change",
    "Delivery",
    "Fate",
    "FileBody",
    "MessageHeld",
    "MessageInfo",
    "NotDue",
    "QueueItem",
    "RecipientInfo",
    "SpooledBody",
    "UnknownMessage",
    "format_age",
    "new_queue_id",
]

POISON_LIMIT = 3  # unexpected errors in a row before a message is put on hold


def format_age(seconds: float) -> str:
    """"45s", "12m", "3h", "5d": how long a message has waited, for people."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def new_queue_id() -> str:
    """Sortable by time (ms, hex), unique by 48 random bits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(6)}"


@dataclass(slots=True, eq=False)
class FileBody:
    """A message too big to hold in memory: `head` (the relay's trace and added header
    fields), then `size - len(head)` bytes of the open file `fd` from offset 0.

    The spool copies it in chunks, so a 25 MiB message never sits in memory whole. The
    fd is the body's own (a dup of the session's), so the session may close its file
    while the spool is still copying; `close()` once the copy is done.
    """

    head: bytes
    fd: int
    size: int
    chunk_size: int = 1 << 20

    def __len__(self) -> int:
        return self.size

    def chunks(self) -> Iterator[bytes]:
        """The whole message in order; pread, so no shared file offset matters."""
        yield self.head
        offset, end = 0, self.size - len(self.head)
        while offset < end:
            chunk = os.pread(self.fd, min(self.chunk_size, end - offset), offset)
            if not chunk:
                raise OSError(f"message file ended {end - offset} bytes early")
            yield chunk
            offset += len(chunk)

    def read(self) -> bytes:
        """The whole message in memory: for what needs it whole (a DKIM signature)."""
        return b"".join(self.chunks())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SpooledBody:
    """A big message's body left in the spool while it is delivered: read a chunk at a
    time as the upstream takes it, so a delivery holds about one chunk, not the message.
    `head` is its first bytes (the header block, for a bounce)."""

    __slots__ = ("_read", "head", "size")

    def __init__(self, head: bytes, size: int, read: Callable[[int, int], Awaitable[bytes]]) -> None:
        self.head = head
        self.size = size
        self._read = read  # (offset, length) -> bytes

    def __len__(self) -> int:
        return self.size

    async def chunks(self, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        offset = 0
        while offset < self.size:
            chunk = await self._read(offset, min(chunk_size, self.size - offset))
            if not chunk:
                raise OSError(f"the spooled body ended {self.size - offset} bytes early")
            yield chunk
            offset += len(chunk)


Body = bytes | SpooledBody  # what a delivery sends: small bodies are read whole


@dataclass(slots=True, kw_only=True)
class QueueItem:
    """A message accepted by a session (or a bounce), as `Queue.put()` takes it."""

    id: str
    created: float
    mail_from: str
    recipients: list[str]
    key_id: str
    mailbox: str
    route: str | None
    body: bytes | FileBody = field(repr=False)


@dataclass(slots=True, kw_only=True)
class Delivery:
    """A claimed message as one attempt needs it, read from the spool when it starts."""

    id: str
    created: float
    mail_from: str
    key_id: str
    mailbox: str
    route: str | None
    attempts: int
    pending: list[str]
    unnotified: list[tuple[str, str]]  # (recipient, reply): failed, bounce not yet stored
    body: Body = field(repr=False)
    stop: bool = False  # put on hold or deleted by an admin since it was claimed


@dataclass(slots=True, kw_only=True)
class AttemptRecord:
    """Everything one attempt learnt, written in one transaction (`QueueStore.record`)."""

    message_id: str
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt: (status, reply)
    notified: list[str] = field(default_factory=list)  # failed recipients the bounce covers
    bounce: QueueItem | None = None
    next_attempt: float = 0.0  # when recipients remain pending
    last_error: str | None = None
    error: str | None = None  # an unexpected error: counts toward POISON_LIMIT
    attempted: bool = True  # False: the message was only released (held or deleted meanwhile)


@dataclass(frozen=True, slots=True)
class NotDue:
    """A claim refused because the message is waiting until `when` (a stale timer)."""

    when: float


class Fate(enum.Enum):
    """What a recorded attempt left of the message."""

    DONE = "done"  # nothing left to do: removed
    RETRY = "retry"  # pending recipients: due again at next_attempt
    HELD = "held"  # on hold (by an admin, or as a poison message)
    DELETED = "deleted"  # an admin deleted it while it was in flight


class Change(enum.Enum):
    """How an admin command took effect."""

    DONE = "done"
    IN_FLIGHT = "in_flight"  # the message is being delivered: effective after this attempt


class UnknownMessage(LookupError):
    def __init__(self, message_id: str) -> None:
        super().__init__(f"no message {message_id} in the queue")


class MessageHeld(Exception):
    def __init__(self, message_id: str) -> None:
        super().__init__(f"{message_id} is on hold; `relay queue release {message_id}` first")


@dataclass(slots=True, kw_only=True)
class RecipientInfo:
    address: str
    status: str
    reply: str | None


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """How much waits in the spool (messages with recipients still to decide, held ones
    included): for metrics and `relay status`."""

    messages: int
    held: int
    oldest_id: str | None
    oldest_created: float | None


@dataclass(slots=True, kw_only=True)
class MessageInfo:
    """One queued message as an operator sees it (no body)."""

    id: str
    created: float
    mail_from: str
    key_id: str
    mailbox: str
    route: str | None
    attempts: int
    next_attempt: float
    last_error: str | None
    held: bool
    in_flight: bool
    size: int
    recipients: list[RecipientInfo]
    node: str | None = None  # the node delivering it now (in flight), for a shared queue

    @property
    def pending(self) -> list[str]:
        return [r.address for r in self.recipients if r.status == "pending"]
