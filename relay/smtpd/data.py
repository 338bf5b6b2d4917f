"""Reading a message after DATA: in chunks, to memory or to disk, never whole and copied.

aiosmtpd keeps every line of a message as its own bytes object, then joins and copies
them: about 9x the message in memory, and a Python loop per line. Here the stream is
read in blocks of up to CHUNK bytes and each block of whole lines is checked and
unstuffed with a few C-speed passes, then appended to a `MessageBody`:

* in memory while the message is small and the relay-wide `MemoryBudget` has room;
* otherwise in an unnamed file in the spool's folder (gone if the relay dies), written
  off the event loop.

The rules are aiosmtpd's: the end is CRLF.CRLF; a leading dot is removed from every line
(RFC 5321 section 4.5.2); a line longer than 1000 bytes with its CRLF is refused (section
4.5.3.1.6); past the size limit (the size SIZE counts, RFC 1870: without the doubled
dots) the rest is read and dropped, then 552. Ours on top: any
CR or LF not in a CRLF pair is refused (SMTP smuggling), and a header block longer than
the header limit is refused with 552 5.3.4 (the header is what the relay parses, so its
size bounds the CPU a message can cost). Errors are answered once the client has sent
the whole message, as RFC 5321 section 4.2.5 implies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay import replies
from relay.internals import buffered, reader_limit

__all__ = ["CHUNK", "DataLimits", "DataResult", "MemoryBudget", "MessageBody", "read_data"]

CHUNK = 64 * 1024  # the most read from the stream at once (the stream pauses at twice this)
_END = b"\r\n.\r\n"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# A refused message is read to its end, so the reply reaches a client that only reads
# after sending; but no further than this many times the size limit.
_DRAIN_LIMIT_FACTOR = 2


class MemoryBudget:
    """Bytes of message data all sessions together may hold in memory; past it, bodies go
    to disk. Taking never waits, so a full budget slows nobody down, it only costs I/O."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True, slots=True)
class DataLimits:
    message: int  # bytes of the message (unstuffed, with its CRLFs), as SIZE counts them
    header: int  # bytes of the header block: its fields with their CRLFs, not the blank line
    in_memory: int  # the largest message kept in memory rather than on disk
    spool_dir: Path  # where bigger messages are written while they arrive
    line: int = 1000  # bytes per line with its CRLF (RFC 5321 section 4.5.3.1.6)


@dataclass(eq=False)
class MessageBody:
    """The message as received (unstuffed), in memory or in an unnamed file."""

    limits: DataLimits
    budget: MemoryBudget
    size: int = 0
    header: bytes = b""  # the header block with its last CRLF, without the blank line
    header_done: bool = False
    _memory: bytearray = field(default_factory=bytearray)
    _reserved: int = 0
    _file: tempfile._TemporaryFileWrapper | None = None  # type: ignore[type-arg]

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    async def write(self, block: bytes) -> None:
        if not block:
            return
        self.size += len(block)
        if self._file is None:
            fits = self.size <= self.limits.in_memory
            if fits and self.budget.take(len(block)):
                self._reserved += len(block)
                self._memory += block
                return
            await self._spill()
        assert self._file is not None
        await asyncio.to_thread(self._file.write, block)

    async def _spill(self) -> None:
        memory, folder = self._memory, self.limits.spool_dir

        def spill() -> tempfile._TemporaryFileWrapper:  # type: ignore[type-arg]
            file = tempfile.TemporaryFile(dir=folder, prefix="incoming-")
            try:
                file.write(memory)
            except BaseException:
                _discard(file)
                raise
            return file

        # The session may be cancelled (its client gone) while the thread writes: the file
        # the thread then returns is nobody's, and was left for the garbage collector.
        made = asyncio.get_running_loop().run_in_executor(None, spill)
        try:
            self._file = await asyncio.shield(made)
        except asyncio.CancelledError:
            made.add_done_callback(_discard_made)
            raise
        self._drop_memory()

    def _drop_memory(self) -> None:
        self.budget.give(self._reserved)
        self._reserved = 0
        self._memory = bytearray()

    def content(self) -> bytes:
        """The message, if it is in memory (see `on_disk`)."""
        assert self._file is None
        return bytes(self._memory)

    async def file_fd(self) -> int:
        """A new fd on the file holding the message (the caller closes it)."""
        assert self._file is not None
        await asyncio.to_thread(self._file.flush)
        return os.dup(self._file.fileno())

    def close(self) -> None:
        self._drop_memory()
        file, self._file = self._file, None
        if file is not None:
            _discard(file)


def _discard_made(made: asyncio.Future[tempfile._TemporaryFileWrapper]) -> None:  # type: ignore[type-arg]
    """Close the file a spill made for a session that was cancelled meanwhile."""
    if not made.cancelled() and made.exception() is None:
        _discard(made.result())


def _discard(file: tempfile._TemporaryFileWrapper) -> None:  # type: ignore[type-arg]
    """Close a message file whose content is done with. Closing flushes what is still
    buffered, which fails again on a full disk; the fd is closed all the same, and the
    error must not escape: it would end DATA without its reply or the session's reset."""
    with contextlib.suppress(OSError):
        file.close()


@dataclass(slots=True)
class DataResult:
    body: MessageBody | None  # None when `reply` refuses the message
    reply: str | None = None
    hang_up: bool = False  # the client sent far past the size limit: answer, then close


class _Reading:
    """The state of one DATA phase: the first error wins, later data is only drained."""

    def __init__(self, limits: DataLimits, budget: MemoryBudget) -> None:
        self.limits = limits
        self.body: MessageBody | None = MessageBody(limits, budget)
        self.reply: str | None = None
        self.received = 0  # bytes of the message so far, unstuffed: what SIZE counts (RFC 1870)
        self.drained = 0  # every byte read, refused or not
        self._header = bytearray()

    def fail(self, reply: str) -> None:
        if self.reply is None:
            self.reply = reply
        if self.body is not None:
            self.body.close()
            self.body = None

    async def lines(self, block: bytes) -> None:
        """A block of whole lines, each ending in CRLF, as they came off the wire."""
        if self.body is None:
            return
        unstuffed = (block[1:] if block.startswith(b".") else block).replace(b"\r\n.", b"\r\n")
        self.received += len(unstuffed)  # not the doubled dots: a message SIZE let in fits
        if self.received > self.limits.message:
            return self.fail(replies.TOO_BIG)
        pairs = block.count(b"\r\n")
        if block.count(b"\r") != pairs or block.count(b"\n") != pairs:
            return self.fail(replies.BARE_LINE_ENDING)
        if max(map(len, block.split(b"\r\n"))) > self.limits.line - 2:
            return self.fail(replies.LINE_TOO_LONG)
        block = unstuffed
        if not self.body.header_done and not self._take_header(block):
            return self.fail(replies.HEADER_TOO_BIG.format(limit=self.limits.header))
        try:
            await self.body.write(block)
        except OSError as exc:
            self.fail(replies.SPOOL_FULL if exc.errno in _DISK_FULL else replies.SPOOL_ERROR)

    def _take_header(self, block: bytes) -> bool:
        """Collect the header block; False once it is over the limit."""
        assert self.body is not None
        header = self._header
        start = max(0, len(header) - 2)
        header += block[: self.limits.header + 4 - len(header)]
        end = 0 if header.startswith(b"\r\n") else header.find(b"\r\n\r\n", start)
        if end >= 0:
            self.body.header, self.body.header_done = bytes(header[: end + 2 if end else 0]), True
            self._header = bytearray()
            return len(self.body.header) <= self.limits.header  # an empty block (end 0) is 0 bytes
        if len(header) > self.limits.header:  # whole lines, no blank one yet: all header
            return False
        self.body.header = bytes(header)  # so far: all of a message that has no body
        return True


async def read_data(
    reader: asyncio.StreamReader, limits: DataLimits, budget: MemoryBudget,
    on_progress: Callable[[], None],
) -> DataResult:
    """Read one message up to and including its CRLF.CRLF; never past it, so commands
    the client pipelined after the message stay in the stream."""
    state = _Reading(limits, budget)
    try:
        with reader_limit(reader, CHUNK):
            await _read(reader, state, on_progress)
    except BaseException:
        state.fail(replies.SPOOL_ERROR)  # releases the body; the caller sees the error
        raise
    if state.reply is not None:
        return DataResult(None, state.reply, hang_up=state.drained > _DRAIN_LIMIT_FACTOR * limits.message)
    assert state.body is not None
    return DataResult(state.body)


async def _read(reader: asyncio.StreamReader, state: _Reading, on_progress: Callable[[], None]) -> None:
    """Blocks up to the end marker. A block that ends mid-line has its last partial line
    carried into the next, so `state.lines` sees whole lines."""
    tail = b"\r\n"  # the last bytes read; at first the CRLF that ended the DATA command
    carry = b""
    while True:
        chunk, last = await _next_block(reader, tail)
        on_progress()
        state.drained += len(chunk)
        if state.reply is not None and state.drained > _DRAIN_LIMIT_FACTOR * state.limits.message:
            return  # refused long ago and still sending: stop reading, the session ends
        data = carry + chunk if carry else chunk
        if last:
            await state.lines(data[:-3])  # the marker's CRLF ends the last line
            return
        tail = (tail + chunk)[-4:]
        cut = data.rfind(b"\r\n") + 2
        if cut >= 2:
            await state.lines(data[:cut])
        carry = data[cut:] if cut >= 2 else data
        if len(carry) > state.limits.line:
            state.fail(replies.LINE_TOO_LONG)
            carry = b""


async def _next_block(reader: asyncio.StreamReader, tail: bytes) -> tuple[bytes, bool]:
    """The next block, at most CHUNK bytes and never past the end marker; and whether it
    ends with the marker.

    `readuntil()` finds a marker that begins in the stream, but one may begin in `tail`,
    bytes already read: the CRLF that ended the DATA command begins the marker of an empty
    message (a lone ".\r\n"), and any line's CRLF may begin it. While `tail` ends with the
    beginning of a marker, the end is looked for in `tail` and what the stream holds, and
    only what comes before it is read. (Reading just the bytes that would complete the
    marker, a few at a time, let a message of blank lines or of ".." lines be read four
    bytes per loop turn, past every limit.)
    """
    partial = next((n for n in (4, 3, 2, 1) if tail.endswith(_END[:n])), 0)
    if partial:
        ahead = buffered(reader, CHUNK)
        if len(ahead) < len(_END) - partial:  # too little to tell: read what would complete it
            chunk = await reader.readexactly(len(_END) - partial)
            return chunk, (tail + chunk).endswith(_END)
        end = (tail + ahead).find(_END)  # tail holds no whole marker: end + 5 > len(tail)
        if end >= 0:
            return await reader.readexactly(end + len(_END) - len(tail)), True
        return await reader.readexactly(len(ahead)), False
    try:
        return await reader.readuntil(_END), True
    except asyncio.LimitOverrunError as exc:  # no end yet: take what is buffered
        return await reader.read(exc.consumed), False
