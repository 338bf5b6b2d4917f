"""SMTP smuggling (CVE-2023-51766 family): a body that hides a fake end-of-data and a
second transaction must not become two messages, here or at the upstream.

Modelled on aiosmtpd's tests/test_smtpsmuggling.py, but over a real TLS session to the
relay with bytes written by hand, since every SMTP client library normalises line endings
and dot-stuffs, which is exactly what an attacker does not do. The relay refuses any bare
CR or LF in DATA, answers once for the whole payload and stays in step with the client.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re

import pytest

from relay import replies

ALICE = "alice@example.com"
BOB = "bob@example.net"
NOTHING_ARRIVES = 0.5
QUEUED = re.compile(r"250 2\.0\.0 OK queued as [0-9a-f]+")


class RawSession:
    """An SMTP session over TLS that sends exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, h, *, starttls: bool) -> RawSession:
        if starttls:
            reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
            session = cls(reader, writer)
            assert (await session.reply()).startswith("220 ")
            assert (await session.command(b"EHLO client.example")).startswith("250")
            assert await session.command(b"STARTTLS") == "220 2.0.0 Ready to start TLS"
            await writer.start_tls(h.tls, server_hostname="127.0.0.1")
        else:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", h.implicit_port, ssl=h.tls, server_hostname="127.0.0.1")
            session = cls(reader, writer)
            assert (await session.reply()).startswith("220 ")
        assert "250-AUTH LOGIN PLAIN" in await session.command(b"EHLO client.example")
        return session

    async def reply(self) -> str:
        """One whole (possibly multi-line) reply, lines joined with newlines."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if not line:
                raise ConnectionError(f"relay closed the connection after {lines!r}")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, line: bytes) -> str:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def nothing_more(self) -> bool:
        """True if the relay sends nothing unasked (no reply to smuggled commands)."""
        try:
            extra = await asyncio.wait_for(self.reader.read(1), 0.3)
        except TimeoutError:
            return True
        return extra == b""

    async def login(self, address: str, secret: str) -> None:
        blob = base64.b64encode(f"\0{address}\0{secret}".encode())
        assert await self.command(b"AUTH PLAIN " + blob) == replies.AUTH_OK

    async def start_message(self, sender: str = ALICE, rcpt: str = BOB) -> None:
        assert await self.command(f"MAIL FROM:<{sender}>".encode()) == replies.MAIL_OK
        assert await self.command(f"RCPT TO:<{rcpt}>".encode()) == replies.RCPT_OK
        assert (await self.command(b"DATA")).startswith("354 ")

    async def close(self) -> None:
        try:
            assert await self.command(b"QUIT") == "221 2.0.0 Bye"
        finally:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def alice(h, *, starttls: bool = False) -> RawSession:
    await h.mailbox(ALICE)
    secret = await h.key(ALICE)
    session = await RawSession.open(h, starttls=starttls)
    await session.login(ALICE, secret)
    return session


HEAD = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: a\r\n\r\nbody"
SMUGGLED = (
    b"MAIL FROM:<alice@example.com>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"From: alice@example.com\r\nSubject: smuggled\r\n\r\nx\r\n"
    b".\r\n"
)
FAKE_ENDS = {
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "LF.LF": b"\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.CR": b"\r.\r",
}


async def send_clean_message(session: RawSession, subject: str = "clean") -> None:
    await session.start_message()
    reply = await session.send(
        f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nall good\r\n.\r\n".encode())
    assert QUEUED.fullmatch(reply), reply


async def assert_only_the_clean_message_arrives(h, subject: str = "clean") -> None:
    (received,) = await h.sink.wait_for(1)
    await asyncio.sleep(NOTHING_ARRIVES)
    assert len(h.sink.messages) == 1
    assert received.rcpt_tos == [BOB]
    assert f"Subject: {subject}\r\n" in received.text
    assert "smuggled" not in received.text
    assert h.sink.handler.attempts == 1


CASES = [pytest.param(end, False, id=f"implicit-tls-{name}") for name, end in FAKE_ENDS.items()] + [
    pytest.param(FAKE_ENDS[name], True, id=f"starttls-{name}") for name in ("LF.CRLF", "CR.CRLF", "LF.LF")
]


@pytest.mark.parametrize(("fake_end", "starttls"), CASES)
async def test_fake_end_of_data_does_not_smuggle_a_second_message(h, fake_end, starttls):
    session = await alice(h, starttls=starttls)
    await session.start_message()
    # the whole payload in one write, as an attacker pipelines it
    assert await session.send(HEAD + fake_end + SMUGGLED) == replies.BARE_LINE_ENDING
    assert await session.nothing_more()  # one reply for the whole payload, none for the smuggled commands
    # in step: a MAIL now is a fresh transaction, not a nested one or a line of a message
    await send_clean_message(session)
    await session.close()
    await assert_only_the_clean_message_arrives(h)


async def test_bare_lf_in_the_middle_of_a_line_is_refused(h):
    session = await alice(h)
    await session.start_message()
    body = b"From: alice@example.com\r\nSubject: lf\r\n\r\nhello\nworld\r\n.\r\n"
    assert await session.send(body) == replies.BARE_LINE_ENDING
    assert replies.BARE_LINE_ENDING.startswith("550 5.6.0 ")
    assert await session.nothing_more()
    await send_clean_message(session)
    await session.close()
    await assert_only_the_clean_message_arrives(h)


@pytest.mark.parametrize("body", [
    b"From: alice@example.com\r\nSubject: cr\r\n\r\nhello\rworld\r\n.\r\n",
    b"From: alice@example.com\nSubject: header lf\r\n\r\nhello\r\n.\r\n",
    b"From: alice@example.com\r\nSubject: trailing cr\r\r\n\r\nhello\r\n.\r\n",
], ids=["bare CR in body", "bare LF in header", "CR CR LF"])
async def test_other_bare_line_endings_are_refused(h, body):
    session = await alice(h)
    await session.start_message()
    assert await session.send(body) == replies.BARE_LINE_ENDING
    await session.close()
    await asyncio.sleep(NOTHING_ARRIVES)
    assert h.sink.messages == []


async def test_dot_stuffed_lines_arrive_unstuffed(h):
    session = await alice(h)
    await session.start_message()
    reply = await session.send(b"From: alice@example.com\r\nSubject: dots\r\n\r\n"
                               b"before\r\n..\r\n..leading dot\r\n...\r\nafter\r\n.\r\n")
    assert QUEUED.fullmatch(reply), reply
    await session.close()
    (received,) = await h.sink.wait_for(1)
    assert received.data.endswith(b"\r\n\r\nbefore\r\n.\r\n.leading dot\r\n..\r\nafter\r\n")


async def test_pipelined_clean_transactions_each_get_their_reply(h):
    """The same bytes an attacker sends, but with real CRLF.CRLF: two honest messages."""
    session = await alice(h)
    await session.start_message()
    payload = HEAD + b"\r\n.\r\n" + SMUGGLED.replace(b"victim@example.net", BOB.encode())
    session.writer.write(payload)
    await session.writer.drain()
    assert QUEUED.fullmatch(await session.reply())
    assert await session.reply() == replies.MAIL_OK
    assert await session.reply() == replies.RCPT_OK
    assert (await session.reply()).startswith("354 ")
    assert QUEUED.fullmatch(await session.reply())
    assert await session.nothing_more()
    await session.close()
    received = await h.sink.wait_for(2)
    assert sorted("smuggled" in m.text for m in received) == [False, True]


async def test_a_bare_cr_in_ehlo_cannot_add_a_header_to_the_message(h):
    """aiosmtpd ends a command at LF, so an EHLO argument can hold a bare CR; the relay puts
    the EHLO name in its Received: header, where that CR would start a forged From:."""
    await h.mailbox(ALICE)
    secret = await h.key(ALICE)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", h.implicit_port, ssl=h.tls, server_hostname="127.0.0.1")
    session = RawSession(reader, writer)
    assert (await session.reply()).startswith("220 ")
    assert (await session.command(b"EHLO x\rFrom: CEO <ceo@bank.example>\r")).startswith("250-relay.test")
    await session.login(ALICE, secret)
    await session.start_message()
    reply = await session.send(b"From: alice@example.com\r\nSubject: trace\r\n\r\nbody\r\n.\r\n")
    assert QUEUED.fullmatch(reply), reply
    await session.close()
    (received,) = await h.sink.wait_for(1)
    parsed = email.message_from_bytes(received.data, policy=email.policy.compat32)
    assert parsed.get_all("From") == [ALICE]
    assert not re.search(rb"(?m)^From: CEO", received.data)
    (trace,) = parsed.get_all("Received")
    assert trace.startswith("from x?From:?CEO?<ceo@bank.example> ([127.0.0.1])\r\n\tby relay.test ")
