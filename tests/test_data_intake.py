"""DATA as the relay reads it: in chunks, to memory or to disk, with aiosmtpd's rules.

The reader is checked two ways: `read_data` on a real asyncio StreamReader fed the bytes
in every possible split (a TCP stream may cut a message anywhere, and the end marker
may straddle two reads), and whole sessions against the real relay over TLS.
"""

from __future__ import annotations

import asyncio

import pytest

from relay import replies
from relay.smtpd.data import DataLimits, MemoryBudget
from tests.support.fs import fill, small_filesystem
from tests.test_data_intake_attacks import read_pieces
from tests.test_smuggling import ALICE, BOB, QUEUED, alice

LIMITS = dict(message=10_000, header=200, in_memory=64)


def limits(tmp_path, **overrides) -> DataLimits:
    return DataLimits(**{**LIMITS, **overrides}, spool_dir=tmp_path)


def reference(raw: bytes) -> bytes:
    """What RFC 5321 section 4.5.2 says the message is: lines up to the first lone dot
    line, one leading dot removed from each."""
    lines = raw.split(b"\r\n")
    out = []
    for line in lines:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in out)


async def read_split(tmp_path, stream: bytes, cuts: list[int], **overrides):
    """`stream` cut at `cuts` and read as one message: (result, the message, the bytes
    left in the reader for the next command)."""
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    budget = MemoryBudget(1 << 20)
    outcome = await read_pieces(limits(tmp_path, **overrides), pieces, budget)
    assert budget.used == 0, "every byte taken from the memory budget is given back"
    return outcome


MESSAGES = [
    b".\r\n",  # empty
    b"\r\n.\r\n",  # one empty line
    b"..\r\n.\r\n",  # a line that is one dot
    b"A: b\r\n\r\n..x\r\n...\r\n.\r\n",
    b"A: b\r\n\r\nline\r\n\r\n.\r\n",
    b"A: b\r\n\r\n" + b"y" * 300 + b"\r\n.\r\n",  # bigger than in_memory: goes to disk
]


@pytest.mark.parametrize("raw", MESSAGES, ids=range(len(MESSAGES)))
async def test_every_split_of_the_stream_reads_the_same_message_and_nothing_after_it(tmp_path, raw):
    stream = raw + b"QUIT\r\n"
    for cut in range(len(stream) + 1):
        result, content, rest = await read_split(tmp_path, stream, [cut])
        assert result.reply is None, (cut, result.reply)
        assert content == reference(raw), cut
        assert rest == b"QUIT\r\n", cut
    result, content, rest = await read_split(tmp_path, stream, list(range(1, len(stream))))
    assert content == reference(raw) and rest == b"QUIT\r\n"


async def test_the_header_block_is_kept_apart_for_the_checks(tmp_path):
    result, _, _ = await read_split(tmp_path, b"A: 1\r\nB: 2\r\n\r\nbody\r\n.\r\n", [7])
    assert result.body.header == b"A: 1\r\nB: 2\r\n" and result.body.header_done
    result, _, _ = await read_split(tmp_path, b"A: 1\r\nB: 2\r\n.\r\n", [])
    assert result.body.header == b"A: 1\r\nB: 2\r\n" and not result.body.header_done


@pytest.mark.parametrize(("raw", "reply"), [
    (b"A: b\r\n\r\n" + b"x" * 20_000 + b"\r\n.\r\n", replies.TOO_BIG),
    (b"A: b\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n", replies.LINE_TOO_LONG),
    (b"A: b\r\n\r\nbare\nline\r\n.\r\n", replies.BARE_LINE_ENDING),
    (b"A: b\r\nC: " + b"x" * 150 + b"\r\nD: " + b"y" * 150 + b"\r\n\r\nbody\r\n.\r\n",
     replies.HEADER_TOO_BIG.format(limit=200)),
], ids=["too-big", "line-too-long", "bare-lf", "header-too-big"])
async def test_refusals_come_after_the_whole_message_and_leave_the_stream_in_step(tmp_path, raw, reply):
    for cuts in ([], [5], [len(raw) - 4], list(range(1, len(raw), 97))):
        result, content, rest = await read_split(tmp_path, raw + b"NOOP\r\n", cuts)
        assert (result.reply, content, rest) == (reply, None, b"NOOP\r\n")


async def test_a_client_that_keeps_sending_far_past_the_limit_is_answered_and_hung_up_on(tmp_path):
    line = b"x" * 98 + b"\r\n"
    result, content, rest = await read_split(tmp_path, b"A: b\r\n\r\n" + line * 2000, [100_000])
    assert (result.reply, result.hang_up) == (replies.TOO_BIG, True)
    assert rest, "reading stopped before the end"
    result, _, _ = await read_split(tmp_path, b"A: b\r\n\r\n" + line * 150 + b".\r\n", [])
    assert (result.reply, result.hang_up) == (replies.TOO_BIG, False)


async def test_a_header_block_exactly_at_the_limit_passes(tmp_path):
    header = b"A: " + b"x" * 195 + b"\r\n"
    assert len(header) == 200
    result, content, _ = await read_split(tmp_path, header + b"\r\nbody\r\n.\r\n", [])
    assert result.reply is None and result.body.header == header


# ------------------------------------------------------------------ whole sessions


async def test_a_message_bigger_than_memory_allows_arrives_byte_for_byte(h):
    """3 MiB (over the 1 MiB kept in memory): written to disk as it arrives, copied into
    the spool in chunks, delivered unchanged, dot lines and all."""
    session = await alice(h, starttls=True)
    lines = [f"line {i} ".encode() + b"z" * 60 for i in range(45_000)]
    lines[100] = b"." + lines[100]  # becomes ".." on the wire, "." again at the sink
    lines[200] = b"."
    body = b"\r\n".join(lines) + b"\r\n"
    header = f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: big\r\n\r\n".encode()
    wire = (header + body).replace(b"\r\n.", b"\r\n..")
    await session.start_message()
    assert QUEUED.fullmatch(await session.send(wire + b".\r\n"))
    await session.close()
    (received,) = await h.sink.wait_for(1)
    assert len(body) > 3 << 20
    assert received.data.endswith(header + body)


async def test_a_header_block_over_the_limit_is_refused_and_the_session_goes_on(relay_with):
    async with relay_with(server="max_header_size = 4096") as h:
        session = await alice(h, starttls=True)
        await session.start_message()
        fields = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 70) for i in range(100))
        reply = await session.send(f"From: {ALICE}\r\n".encode() + fields + b"\r\nbody\r\n.\r\n")
        assert reply == "552 5.3.4 Message header block exceeds the fixed maximum of 4096 bytes"
        await session.start_message()
        assert QUEUED.fullmatch(await session.send(f"From: {ALICE}\r\n\r\nok\r\n.\r\n".encode()))
        await session.close()
        (received,) = await h.sink.wait_for(1)
        assert b"X-Filler" not in received.data


async def test_a_flood_past_the_size_limit_gets_552_and_the_connection_closed(relay_with):
    async with relay_with(server="max_message_size = 100000") as h:
        session = await alice(h, starttls=True)
        await session.start_message()
        session.writer.write(f"From: {ALICE}\r\n\r\n".encode() + (b"z" * 998 + b"\r\n") * 300)
        assert await session.reply() == replies.TOO_BIG
        assert await asyncio.wait_for(session.reader.read(), 5) == b""  # closed


async def test_commands_pipelined_after_the_message_are_answered(h):
    session = await alice(h, starttls=True)
    await session.start_message()
    session.writer.write(f"From: {ALICE}\r\n\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n".encode())
    assert QUEUED.fullmatch(await session.reply())
    assert await session.reply() == "250 2.0.0 OK"
    assert await session.reply() == "221 2.0.0 Bye"
    await h.sink.wait_for(1)


async def test_an_empty_message_gets_an_answer(h):
    session = await alice(h, starttls=True)
    await session.start_message()
    assert await session.send(b".\r\n") == replies.NO_FROM_HEADER
    await session.close()


async def test_a_key_revoked_while_the_message_arrives_gets_no_250(h):
    """MAIL FROM saw a valid key; the end of data asks the keystore again."""
    session = await alice(h, starttls=True)
    await session.start_message()
    session.writer.write(f"From: {ALICE}\r\nTo: {BOB}\r\n\r\nfirst half\r\n".encode())
    (key,) = await h.relay.store.list_keys(mailbox=ALICE)
    await h.relay.store.revoke_key(key.id, actor="test")
    reply = await session.send(b"second half\r\n.\r\n")
    assert reply == "554 5.7.8 Message refused: this auth key has been revoked"
    assert h.sink.messages == []


async def test_a_full_disk_while_a_big_message_arrives_is_a_temporary_refusal(tmp_path, sink):
    from tests.conftest import running_relay

    with small_filesystem(tmp_path / "spoolfs", "8m") as fs:
        async with running_relay(tmp_path, sink, spool="spoolfs/spool.db") as h:
            session = await alice(h, starttls=True)
            await session.start_message()
            await asyncio.to_thread(fill, fs)
            chunk = b"x" * 998 + b"\r\n"
            reply = await session.send(f"From: {ALICE}\r\n\r\n".encode() + chunk * 2048 + b".\r\n")
            assert reply == replies.SPOOL_FULL
            assert await session.command(b"NOOP") == "250 2.0.0 OK"


# ------------------------------------------------------------------ delivery in chunks


async def test_a_message_sent_in_chunks_is_dot_stuffed_across_chunk_boundaries(sink):
    """relay.internals.data_in_chunks against a real SMTP server: a line-leading dot right
    after a chunk that ends in CRLF, or in a lone CR, arrives as one dot."""
    import aiosmtplib

    from relay.internals import data_in_chunks

    pieces = [b"From: a@example.com\r\n\r\nfirst\r\n", b".one\r\n", b"..two\r", b"\n.three\r\n", b"."]
    pieces.append(b"\r\nend\r\n")

    async def chunks():
        for piece in pieces:
            yield piece

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False, timeout=5)
    await client.connect()
    await client.mail("a@example.com")
    await client.rcpt("b@example.net")
    response = await data_in_chunks(client, chunks(), timeout=5)
    assert response.code == 250
    await client.quit()
    (received,) = await sink.wait_for(1)
    assert received.data == b"".join(pieces)
