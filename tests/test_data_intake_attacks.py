"""DATA intake under attack: hostile clients, a full disk, broken upstreams.

`read_data` is checked against a reference decoder written straight from RFC 5321
section 4.5.2 over random messages cut at random places, with blocks and limits shrunk so
that every boundary (a block, the stream's limit, the memory budget, the header and line
limits) falls inside short messages; whole sessions run against the real relay over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import socket
import sqlite3
import struct
import sys
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import replies
from relay.smtpd import data as intake
from relay.smtpd.data import DataLimits, MemoryBudget, read_data
from tests.conftest import running_relay
from tests.support.fs import fill, small_filesystem
from tests.support.waiting import wait_until
from tests.test_smuggling import ALICE, BOB, QUEUED, alice

END = b"\r\n.\r\n"
DRAIN_FACTOR = 2  # a refused message is read to at most this many times the size limit


# ------------------------------------------------------------------ the reference


@dataclass(frozen=True)
class Expected:
    content: bytes  # the message, unstuffed
    rest: bytes  # what follows the end marker: the next commands
    wire: int  # bytes before the marker as sent (dots doubled): what a flood is measured in
    refusals: frozenset[str]  # every reply the message deserves; empty: accepted


def decode(stream: bytes, limits: DataLimits) -> Expected:
    """RFC 5321 section 4.5.2 plainly: the message ends at the first CRLF.CRLF, counting
    the CRLF that ended the DATA command; each line loses one leading dot."""
    virtual = b"\r\n" + stream
    end = virtual.index(END)
    wire, rest = virtual[2:end + 2], virtual[end + len(END):]
    lines = wire.split(b"\r\n")[:-1] if wire else []
    content = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    refusals = set()
    if len(content) > limits.message:  # RFC 1870: the doubled dots do not count
        refusals.add(replies.TOO_BIG)
    if any(b"\r" in line or b"\n" in line for line in lines):
        refusals.add(replies.BARE_LINE_ENDING)
    if any(len(line) + 2 > limits.line for line in lines):
        refusals.add(replies.LINE_TOO_LONG)
    blank = 0 if content.startswith(b"\r\n") else content.find(b"\r\n\r\n") + 2
    header = content if blank == 1 else content[:blank]  # no blank line: all of it is header
    if len(header) > limits.header:
        refusals.add(replies.HEADER_TOO_BIG.format(limit=limits.header))
    return Expected(content, rest, len(wire), frozenset(refusals))


async def read_pieces(reader_limits: DataLimits, pieces: list[bytes], budget: MemoryBudget):
    """`read_data` on a real StreamReader fed `pieces` one loop turn apart, as TCP may cut
    them; returns (result, the message it holds or None, what is left in the stream)."""
    reader = asyncio.StreamReader(limit=1001)  # aiosmtpd's command-line limit

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        result = await read_data(reader, reader_limits, budget, lambda: None)
    finally:
        await feeder
    content = None
    if result.body is not None:
        try:
            if result.body.on_disk:
                fd = await result.body.file_fd()
                try:
                    content = os.pread(fd, result.body.size + 1, 0)
                finally:
                    os.close(fd)
            else:
                content = result.body.content()
        finally:
            result.body.close()
    return result, content, await reader.read()


# ------------------------------------------------------------------ property: any message, any cut

TOKENS = [b"\r\n", b"\r\n", b"\r\n", b".", b".", b"\r", b"\n", b"a", b"Subject: x", b"\x00", b"\xff\xfe",
          b"\r\n.\r\n", b"\r\n..\r\n", b"\r\n\r\n", b" "]

FLOODS = [b"\r\n", b"..\r\n", b"ab\r\n", b"\r"]


@st.composite
def streams(draw):
    """A message made of tokens that meet SMTP's edge cases, its end marker, then commands."""
    body = b"".join(draw(st.lists(st.sampled_from(TOKENS), max_size=60)))
    if draw(st.integers(0, 4)) == 0:  # lines that each end as an end marker might begin
        body = draw(st.sampled_from(FLOODS)) * draw(st.integers(1, 200)) + body
    if draw(st.booleans()):
        body += b"x" * draw(st.integers(0, 120))  # a long line, sometimes
    ending = draw(st.sampled_from([END, b"\r\n" + END, b".\r\n"]))
    if ending == b".\r\n" and body and not body.endswith(b"\r\n"):
        ending = END  # a lone dot line ends the message only at a line's start
    return body + ending + draw(st.sampled_from([b"", b"QUIT\r\n", b"NOOP\r\n.\r\n"]))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=streams(), chunk=st.integers(8, 64), message=st.integers(1, 400),
       header=st.integers(1, 80), line=st.integers(3, 60), in_memory=st.integers(0, 120),
       budget=st.integers(0, 200), cuts=st.lists(st.integers(0, 1000), max_size=8))
async def test_any_message_cut_anywhere_reads_as_the_reference_decodes_it(
    tmp_path, monkeypatch, stream, chunk, message, header, line, in_memory, budget, cuts,
):
    monkeypatch.setattr(intake, "CHUNK", chunk)  # blocks of a few bytes: boundaries everywhere
    limits = DataLimits(message=message, header=header, in_memory=in_memory, spool_dir=tmp_path, line=line)
    expected = decode(stream, limits)
    positions = sorted({c for c in cuts if 0 < c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *positions], [*positions, len(stream)], strict=True)]
    memory = MemoryBudget(budget)
    result, content, rest = await read_pieces(limits, pieces, memory)
    assert memory.used == 0
    if expected.refusals:
        assert result.body is None and result.reply in expected.refusals, (result.reply, expected.refusals)
    else:
        assert result.reply is None, result.reply
        assert content == expected.content
    # too big is known once a block of whole lines passes the limit; reading stops at twice it
    flooding = DRAIN_FACTOR * message + 2 * (chunk + line) + len(END)
    if replies.TOO_BIG in expected.refusals and expected.wire > flooding:
        assert result.hang_up, "a client sending far past the size limit is hung up on"
    if result.hang_up:  # read no further than needed to know the client is flooding
        assert expected.wire > DRAIN_FACTOR * message - len(END)
        assert stream.endswith(rest)
    else:
        assert rest == expected.rest


# ------------------------------------------------------------------ hostile clients, real relay


def message_files(folder: Path) -> list[str]:
    """The message files the process holds open: unnamed (deleted) files in `folder`, the
    spool's, as /proc/self/fd shows them."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{folder}/") and target.endswith("(deleted)"):
                found.append(target)
    return found


def reset(session) -> None:
    """The client vanishes: its socket closed with a TCP reset, nothing flushed."""
    sock = session.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    session.writer.transport.abort()


@pytest.mark.parametrize("line", [b"\r\n", b"..\r\n"], ids=["blank-lines", "dot-lines"])
async def test_a_message_of_blank_or_dot_lines_past_the_size_limit_gets_552_and_the_connection_closed(
    relay_with, line,
):
    """Each of these lines ends the way an end-of-data marker begins; the reader used to
    take them four bytes at a time past every limit, holding them all, and never hang up."""
    async with relay_with(server="max_message_size = 100000") as h:
        session = await alice(h, starttls=True)
        await session.start_message()
        session.writer.write(line * (300_000 // len(line)))
        assert await session.reply() == replies.TOO_BIG
        assert await asyncio.wait_for(session.reader.read(), 5) == b""  # closed


async def test_a_disk_full_when_the_message_file_is_flushed_is_452_and_the_session_goes_on(tmp_path, sink):
    """The last bytes of a message on disk sit in the file's buffer until the end of DATA;
    a full disk fails their flush, and again the file's close. That second failure used
    to end DATA with 451 and no reset: the next MAIL got "503 nested MAIL command"."""
    with small_filesystem(tmp_path / "spoolfs", "8m") as fs:
        # max_data_memory = 1: every message goes to a file, however small
        async with running_relay(tmp_path, sink, spool="spoolfs/spool.db", server="max_data_memory = 1") as h:
            session = await alice(h, starttls=True)
            await session.start_message()
            filler = await asyncio.to_thread(fill, fs)
            reply = await session.send(f"From: {ALICE}\r\n\r\n".encode() + b"x" * 500 + b"\r\n.\r\n")
            assert reply == replies.SPOOL_FULL
            assert message_files(fs) == []
            filler.unlink()
            await session.start_message()
            assert QUEUED.fullmatch(await session.send(f"From: {ALICE}\r\n\r\nagain\r\n.\r\n".encode()))
            await session.close()
            (received,) = await h.sink.wait_for(1)
            assert received.data.endswith(b"\r\n\r\nagain\r\n")



async def test_the_limits_hold_to_the_byte(relay_with):
    """max_message_size counts what SIZE counts (RFC 1870): the message's octets with their
    CRLFs, not the dots doubled on the wire (so a message SIZE let through is not refused
    at its end); a line may have 1000 bytes with its CRLF (RFC 5321 4.5.3.1.6), its
    doubled dot included; the header block max_header_size bytes."""
    async with relay_with(server="max_message_size = 4000\nmax_header_size = 200") as h:
        session = await alice(h, starttls=True)
        start = f"From: {ALICE}\r\n".encode()
        header = start + b"X: " + b"h" * (200 - len(start) - 5) + b"\r\n"
        dot_lines = (b"." + b"d" * 97 + b"\r\n") * 37

        async def send(content: bytes) -> str:
            await session.start_message()
            return await session.send(content.replace(b"\r\n.", b"\r\n..") + b".\r\n")

        def sized(total: int) -> bytes:  # the 200-byte header, a blank line, dot lines, filler
            content = header + b"\r\n" + dot_lines
            return content + b"f" * (total - len(content) - 2) + b"\r\n"

        assert len(header) == 200 and len(sized(4000)) == 4000
        assert QUEUED.fullmatch(await send(sized(4000)))
        assert await send(sized(4001)) == replies.TOO_BIG
        assert QUEUED.fullmatch(await send(header + b"\r\n" + b"L" * 998 + b"\r\n"))
        assert QUEUED.fullmatch(await send(header + b"\r\n." + b"L" * 996 + b"\r\n"))  # 1000 on the wire
        assert await send(header + b"\r\n" + b"L" * 999 + b"\r\n") == replies.LINE_TOO_LONG
        assert await send(header + b"\r\n." + b"L" * 997 + b"\r\n") == replies.LINE_TOO_LONG
        too_big_header = header[:-2] + b"h\r\n\r\nbody\r\n"
        assert await send(too_big_header) == replies.HEADER_TOO_BIG.format(limit=200)
        await session.close()
        received = await h.sink.wait_for(3)
        assert received[0].data.endswith(b"\r\n\r\n" + dot_lines + b"f" * 96 + b"\r\n")

async def test_a_disk_too_full_for_the_spool_to_copy_a_big_message_is_452_and_nothing_is_left(tmp_path, sink):
    """Room for the message's file, not for the spool's copy of it (the relay's own write,
    in chunks, of a FileBody): a temporary refusal, both files closed, and the same
    message goes through once there is room."""
    with small_filesystem(tmp_path / "spoolfs", "16m") as fs:
        async with running_relay(tmp_path, sink, spool="spoolfs/spool.db") as h:
            session = await alice(h, starttls=True)
            filler = await asyncio.to_thread(fill, fs)
            os.truncate(filler, filler.stat().st_size - (3 << 20) - (512 << 10))
            body = big_body(2 << 20, seed=10)
            assert await submit_raw(session, body) == replies.SPOOL_FULL
            assert message_files(fs) == []
            filler.unlink()
            assert QUEUED.fullmatch(await submit_raw(session, body))
            (received,) = await h.sink.wait_for(1)
            assert received.data.endswith(b"\r\n\r\n" + body)

@pytest.mark.parametrize("size", [300_000, 1_500_000], ids=["in-memory", "on-disk"])
async def test_a_client_reset_mid_data_gives_back_its_memory_and_its_file(h, size):
    session = await alice(h, starttls=True)
    (server,) = h.relay.registry.live
    memory = server._memory
    await session.start_message()
    session.writer.write(f"From: {ALICE}\r\n\r\n".encode() + (b"y" * 98 + b"\r\n") * (size // 100))
    await session.writer.drain()
    if size > 1 << 20:
        await wait_until(lambda: message_files(h.folder), what="the message to go to a file")
    else:
        await wait_until(lambda: memory.used > 0, what="the message to arrive in memory")
    reset(session)
    await wait_until(lambda: not h.relay.registry.live, what="the session to end")
    assert memory.used == 0
    assert message_files(h.folder) == []
    assert h.sink.messages == []


async def test_a_client_gone_while_its_big_message_is_stored_still_gets_it_stored_and_sent(h):
    """The spool's copy of a message file is shielded from the session's cancellation: it
    completes, the message is delivered whole, and the copy's fd and the session's file
    are both closed. The spool's write lock is held meanwhile, so the client is surely
    gone while the copy waits."""
    session = await alice(h, starttls=True)
    body = big_body(2 << 20, seed=9)
    header = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: gone\r\n\r\n".encode()
    store = h.relay.queue.store
    await session.start_message()
    with contextlib.closing(sqlite3.connect(h.folder / "spool.db", isolation_level=None)) as spool:
        spool.execute("BEGIN IMMEDIATE")
        writes = store.writes
        session.writer.write((header + body).replace(b"\r\n.", b"\r\n..") + b".\r\n")
        await wait_until(lambda: store.writes > writes,
                         what="the relay to start storing the message")
        reset(session)
        await wait_until(lambda: not h.relay.registry.live, what="the session to end")
        spool.execute("ROLLBACK")
    (received,) = await h.sink.wait_for(1)
    assert received.data.endswith(header + body)
    await wait_until(lambda: not message_files(h.folder), what="every message file to be closed")

async def test_a_session_cancelled_while_its_message_goes_to_disk_leaves_no_file_behind(tmp_path):
    """aiosmtpd cancels a session whose client left. If that lands while a thread writes
    what was held in memory to the message's new file, the file the thread returns is
    nobody's: it was left to the garbage collector (an fd held meanwhile, a ResourceWarning).
    A big memory budget makes that write long enough to land in every time."""
    size = 16 << 20
    limits = DataLimits(message=64 << 20, header=1000, in_memory=64 << 20, spool_dir=tmp_path)
    memory = MemoryBudget(size)
    reader = asyncio.StreamReader(limit=1001)
    line = b"z" * 998 + b"\r\n"
    reader.feed_data(b"A: b\r\n\r\n" + line * (size // len(line) + 100))  # past the budget: to disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        task = asyncio.create_task(read_data(reader, limits, memory, lambda: None))
        while not message_files(tmp_path):  # the thread has made the file and is writing it
            assert not task.done()
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: not message_files(tmp_path), what="the message file to be closed")
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert memory.used == 0



# ------------------------------------------------------------------ big deliveries, broken upstreams

Stage = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedUpstream:
    """A plain SMTP upstream. Its first connection's DATA does what `first_data` says
    (stall, drop, pause: it answers DATA itself); every other DATA is answered 354, read
    whole, kept (unstuffed) in `messages` and answered 250. Written by hand, since aiosmtpd
    cannot be made to misbehave this way."""

    def __init__(self, first_data: Stage | None = None) -> None:
        self.first_data = first_data
        self.messages: list[bytes] = []
        self.peers: list[tuple[str, int]] = []  # the relay's end of each connection
        self.server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername"))
        stage = self.first_data if len(self.peers) == 1 else None
        self._writers.append(writer)
        writer.write(b"220 upstream.test ESMTP\r\n")
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-upstream.test\r\n250-SIZE 104857600\r\n250 8BITMIME\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                elif verb == b"DATA" and stage is not None:
                    stage, now = None, stage
                    await now(reader, writer)
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await self.take(reader, writer)
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 ok\r\n")

    async def take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read: bytes = b"",
                   ) -> None:
        """Read the rest of a message (`read`: its first bytes, read already), keep it, 250."""
        wire = read + await reader.readuntil(END)
        self.messages.append(unstuff(wire[:-len(END) + 2]))
        writer.write(b"250 2.0.0 taken\r\n")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        await wait_until(lambda: len(self.messages) >= count, timeout, f"{count} message(s) upstream")
        return self.messages

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 27)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.transport.abort()
        self.server.close()
        await self.server.wait_closed()


def relay_to(folder: Path, upstream, *, timeout: str = "5s", **parts):
    """The real relay (as the `h` fixture runs it) delivering to `upstream`, with the
    upstream's timeout set to `timeout`."""
    return running_relay(folder, upstream, upstream_timeout=timeout, **parts)


def unstuff(wire: bytes) -> bytes:
    """Lines as sent after 354 (each ending in CRLF) without their doubled dots."""
    lines = wire.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def big_body(size: int, seed: int) -> bytes:
    """`size` bytes or so of lines of up to 1000 bytes on the wire: any byte but CR and LF
    (NUL, 8-bit), a third of the lines starting with a dot, some empty, some a lone dot."""
    rng = random.Random(seed)
    raw = rng.randbytes(size).translate(_NO_CR_LF)
    lines, at = [], 0
    while at < len(raw):
        line = raw[at:at + rng.choice([0, 1, 2, rng.randrange(998), 998])]
        at += len(line)
        if rng.random() < 0.33:
            line = b"." + line
        if line.startswith(b"."):  # its dot is doubled on the wire: 1000 bytes with CRLF at most
            line = line[:997]
        lines.append(line + b"\r\n")
    return b"".join(lines)


_NO_CR_LF = bytes.maketrans(b"\r\n", b"rn")


async def submit_raw(session, body: bytes, subject: str = "big") -> str:
    """Send one message from alice, dot-stuffed by hand; returns the relay's reply."""
    header = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\n".encode()
    await session.start_message()
    return await session.send((header + body).replace(b"\r\n.", b"\r\n..") + b".\r\n")


async def submit(session, body: bytes, subject: str = "big") -> str:
    """`submit_raw`, which must be queued; returns the queue id."""
    reply = await submit_raw(session, body, subject)
    assert QUEUED.fullmatch(reply), reply
    return reply.rsplit(" ", 1)[1]


def in_spool(path: Path, queue_id: str) -> bool:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM message WHERE id = ?", (queue_id,)).fetchone()[0] > 0


def holds_connection(peer: tuple[str, int]) -> bool:
    """Whether a socket of this process still has the local end `peer` (/proc/net/tcp: an
    inode of 0 is a socket no process holds any more)."""
    port = f"{peer[1]:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(row[1].endswith(f":{port}") and row[9] != "0" for row in rows)


async def test_random_bytes_in_a_big_message_arrive_byte_for_byte(h):
    """NUL, 8-bit bytes, dot lines everywhere, lines of 0 to 998 bytes: 3 MiB in, read in
    blocks, spilled, copied into the spool, read back in 1 MiB pieces, sent in chunks."""
    body = big_body(3 << 20, seed=1)
    await submit(await alice(h, starttls=True), body)
    (received,) = await h.sink.wait_for(1)
    assert received.data.endswith(b"\r\n\r\n" + body)
    assert received.data.count(b"\r\n\r\n" + body) == 1


async def test_an_upstream_that_stalls_mid_data_is_given_up_on_and_the_message_sent_again(tmp_path):
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"354 go ahead\r\n")
        await reader.readexactly(200_000)
        await asyncio.Event().wait()  # reads nothing more, answers nothing

    body = big_body(2 << 20, seed=2)
    async with ScriptedUpstream(stall) as upstream, relay_to(tmp_path, upstream, timeout="1s") as h:
        await submit(await alice(h, starttls=True), body)
        (received,) = await upstream.wait_for(1)
        assert received.endswith(b"\r\n\r\n" + body)
        assert len(upstream.peers) == 2
        await wait_until(lambda: not holds_connection(upstream.peers[0]),
                         what="the relay to let go of the stalled connection")


async def test_an_upstream_that_drops_mid_chunk_gets_the_message_again_whole(tmp_path):
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"354 go ahead\r\n")
        await reader.readexactly(1_500_000)  # past the first 1 MiB piece
        writer.transport.abort()

    body = big_body(2 << 20, seed=3)
    async with ScriptedUpstream(drop) as upstream, relay_to(tmp_path, upstream) as h:
        await submit(await alice(h, starttls=True), body)
        (received,) = await upstream.wait_for(1)
        assert received.endswith(b"\r\n\r\n" + body)
        assert len(upstream.peers) == 2


async def test_a_refusal_at_the_end_of_a_chunked_data_leaves_the_connection_fit_for_the_retry(h):
    """A 4xx to the end of a message sent in chunks: deferred, RSET, and the retry goes out
    whole on the same connection."""
    sink = h.sink.handler
    sink.data_reply = "451 4.3.0 try again later"

    async def accept_retries() -> None:
        if sink.attempts > 1:
            sink.data_reply = None

    sink.before_data_reply = accept_retries
    body = big_body(2 << 20, seed=4)
    await submit(await alice(h, starttls=True), body)
    (received,) = await h.sink.wait_for(1)
    assert sink.attempts == 2
    assert received.data.endswith(b"\r\n\r\n" + body)
    assert h.sink.handler.connections == 1  # RSET after the refusal, then reused


async def test_a_big_message_is_dkim_signed_and_verifies(relay_with, tmp_path):
    from relay.signing import generate_key
    from tests.test_dkim import verify

    record = generate_key("example.com", "s1", tmp_path / "dkim.key", "ed25519")
    extra = '\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "dkim.key"\n'
    async with relay_with(upstream_extra=extra) as h:
        body = big_body(2 << 20, seed=5)
        await submit(await alice(h, starttls=True), body)
        (received,) = await h.sink.wait_for(1)
    assert received.data.endswith(b"\r\n\r\n" + body)
    assert await verify(received.data, [record])
    assert not await verify(received.data[:-3] + b"X\r\n", [record])


async def test_a_message_deleted_while_its_big_body_is_being_sent_is_sent_whole_then_gone(tmp_path):
    """`relay queue delete` on a message in flight only marks it; the body the delivery is
    reading stays until the attempt ends, so another message stored meanwhile (which might
    reuse its row) cannot slip into what is sent."""
    go_on = asyncio.Event()
    paused = asyncio.Event()

    async def pause(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"354 go ahead\r\n")
        read = await reader.readexactly(1_500_000)  # past the first 1 MiB piece
        paused.set()
        await go_on.wait()
        await upstream.take(reader, writer, read)

    first, second = big_body(2 << 20, seed=6), big_body(2 << 20, seed=7)
    async with ScriptedUpstream(pause) as upstream, relay_to(tmp_path, upstream) as h:
        session = await alice(h, starttls=True)
        queue_id = await submit(session, first)
        await asyncio.wait_for(paused.wait(), 10)
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(h.config_path), "queue", "delete", queue_id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), 30)
        assert cli.returncode == 0, err
        assert out.decode() == f"{queue_id}: in flight; removed after the current attempt\n"
        await submit(session, second, subject="second")
        go_on.set()
        await upstream.wait_for(2)
        assert sorted(m.endswith(b"\r\n\r\n" + first) + 2 * m.endswith(b"\r\n\r\n" + second)
                      for m in upstream.messages) == [1, 2]
        await wait_until(lambda: not in_spool(tmp_path / "spool.db", queue_id),
                         what="the message to leave the spool")


@pytest.mark.parametrize("size", [1000, 2 << 20], ids=["whole", "in-chunks"])
async def test_an_upstream_that_answers_data_with_250_instead_of_354_has_not_taken_the_message(
    tmp_path, size,
):
    """A 2xx where 354 was due: nothing of the message was sent, so it is not delivered
    (aiosmtplib raises SMTPDataError(250), which read as the upstream's "sent")."""
    async def no_354(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"250 2.0.0 sure\r\n")

    body = big_body(size, seed=8)
    async with ScriptedUpstream(no_354) as upstream, relay_to(tmp_path, upstream) as h:
        await submit(await alice(h, starttls=True), body)
        (received,) = await upstream.wait_for(1)
        assert received.endswith(b"\r\n\r\n" + body)
        assert len(upstream.peers) == 2  # not RSET and reused: the upstream may be reading a message


LINES = [b"", b".", b"..", b".x", b"x.", b"\x00", b"\xff\x80", b"plain text", b". .", b"x" * 200]


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(st.sampled_from(LINES), min_size=1, max_size=40),
       cuts=st.lists(st.integers(0, 2000), max_size=10))
async def test_any_body_cut_into_any_chunks_arrives_byte_for_byte(sink, lines, cuts):
    """relay.internals.data_in_chunks against a real SMTP server: each chunk is dot-stuffed
    on its own, so a line-leading dot just after a cut (after a CRLF, between CR and LF,
    or after a chunk that is one byte) must still be doubled, and only that one."""
    import aiosmtplib

    from relay.internals import data_in_chunks

    body = b"".join(line + b"\r\n" for line in lines)
    positions = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *positions], [*positions, len(body)], strict=True)]

    async def chunks():
        for piece in pieces:
            yield piece

    sink.handler.messages.clear()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False, timeout=5)
    await client.connect()
    try:
        await client.mail("a@example.com")
        await client.rcpt("b@example.net")
        assert (await data_in_chunks(client, chunks(), timeout=5)).code == 250
    finally:
        await client.quit()
    (received,) = sink.handler.messages
    assert received.data == body
