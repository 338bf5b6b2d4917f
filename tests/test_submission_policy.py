"""Submission policy as a client sees it: who may send as whom (envelope and header),
message size, recipients per message, per-key rates, the trace and submission headers the
relay adds, the enhanced codes on every reply, the connection cap and pooled sessions."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import time

import aiosmtplib
import pytest

from relay import replies

ALICE = "alice@example.com"
BOB = "bob@example.net"
NOTHING_ARRIVES = 0.5  # seconds to wait before asserting that the sink got nothing more


def split(reply: str) -> tuple[int, str]:
    """"553 5.7.1 text" → (553, "5.7.1 text"): what aiosmtplib reports as (code, message)."""
    return int(reply[:3]), reply[4:]


def response(resp: aiosmtplib.SMTPResponse) -> tuple[int, str]:
    return resp.code, resp.message


def message(sender: str = ALICE, *, subject: str = "hi", extra: str = "", body: str = "hello") -> bytes:
    return f"From: {sender}\r\nTo: {BOB}\r\nSubject: {subject}\r\n{extra}\r\n{body}\r\n".encode()


async def alice_session(h, *, aliases=(), implicit: bool = False, **key_options):
    """Alice's mailbox, a key for it, and a logged-in client: (client, secret)."""
    await h.mailbox(ALICE, aliases=aliases)
    secret = await h.key(ALICE, **key_options)
    return await h.login(ALICE, secret, implicit=implicit), secret


async def assert_sink_stays_at(h, count: int) -> None:
    await asyncio.sleep(NOTHING_ARRIVES)
    assert len(h.sink.messages) == count


def headers_of(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


# ------------------------------------------------------------------ envelope sender


async def test_mail_from_another_address_is_refused(h):
    await h.mailbox("carol@example.com")
    client, _ = await alice_session(h)
    for sender in ("carol@example.com", "alice@example.org", "alice@evil.example", "mallory@example.com"):
        assert response(await client.execute_command(b"MAIL", f"FROM:<{sender}>".encode())) == split(
            replies.SENDER_NOT_OWNED)
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await client.sendmail("carol@example.com", [BOB], message("carol@example.com"))
    assert (refused.value.code, refused.value.message) == split(replies.SENDER_NOT_OWNED)
    await client.quit()
    await assert_sink_stays_at(h, 0)


async def test_mail_from_an_alias_is_allowed_and_delivered(h):
    client, _ = await alice_session(h, aliases=["sales@example.com"])
    code, text = await client.execute_command(b"MAIL", b"FROM:<sales@example.com>")
    assert (code, text) == split(replies.MAIL_OK)
    await client.rset()
    await client.sendmail("sales@example.com", [BOB], message("Sales <sales@example.com>"))
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    assert received.mail_from == "sales@example.com"
    assert received.rcpt_tos == [BOB]


@pytest.mark.parametrize("sender", ["alice@EXAMPLE.COM", "ALICE@EXAMPLE.COM", "Alice@Example.Com"])
async def test_mail_from_is_case_insensitive(h, sender):
    client, _ = await alice_session(h)
    code, text = await client.execute_command(b"MAIL", f"FROM:<{sender}>".encode())
    assert (code, text) == split(replies.MAIL_OK)
    await client.quit()


async def test_null_sender_is_refused(h):
    client, _ = await alice_session(h)
    assert response(await client.execute_command(b"MAIL", b"FROM:<>")) == split(replies.NULL_SENDER)
    # the session goes on normally afterwards
    await client.sendmail(ALICE, [BOB], message())
    await client.quit()
    await h.sink.wait_for(1)


async def test_mail_before_auth_is_refused(h):
    await h.mailbox(ALICE)
    client = await h.client()
    assert response(await client.execute_command(b"MAIL", f"FROM:<{ALICE}>".encode())) == split(
        replies.AUTH_REQUIRED)
    assert response(await client.execute_command(b"MAIL", b"FROM:<>")) == split(replies.AUTH_REQUIRED)
    # and nothing about the session was half-started: RCPT still needs a MAIL first
    assert response(await client.execute_command(b"RCPT", f"TO:<{BOB}>".encode())) == (
        503, "5.5.1 Error: need MAIL command")
    await client.quit()


# ------------------------------------------------------------------ header sender


@pytest.mark.parametrize("extra_headers", [
    "From: carol@example.com\r\n",
    "From: Alice <alice@evil.example>\r\n",
    "From: alice@example.com, eve@evil.example\r\n",
    "From: \"alice@example.com\" <eve@evil.example>\r\n",
    "From: alice@example.com\r\nSender: eve@evil.example\r\n",
    "From: alice@example.com\r\nFrom: eve@evil.example\r\n",
])
async def test_header_from_or_sender_not_owned_is_refused_at_end_of_data(h, extra_headers):
    client, _ = await alice_session(h)
    await client.mail(ALICE)
    await client.rcpt(BOB)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(f"{extra_headers}Subject: x\r\n\r\nbody\r\n".encode())
    assert (refused.value.code, refused.value.message) == split(replies.HEADER_FROM_NOT_OWNED)
    await client.quit()
    await assert_sink_stays_at(h, 0)


async def test_header_from_and_sender_may_be_the_mailbox_or_an_alias(h):
    client, _ = await alice_session(h, aliases=["sales@example.com"])
    await client.sendmail(ALICE, [BOB], message("Sales Team <SALES@example.com>",
                                                extra=f"Sender: {ALICE}\r\n"))
    await client.sendmail(ALICE, [BOB], message("\"Alice A.\" <alice@example.com>", subject="two"))
    await client.quit()
    first, second = sorted(await h.sink.wait_for(2), key=lambda m: "Subject: two" in m.text)
    assert "From: Sales Team <SALES@example.com>" in first.text
    assert "Subject: two" in second.text


@pytest.mark.parametrize("header_block", [
    "From : eve@evil.example\r\nFrom: alice@example.com\r\n",  # obsolete "From :" syntax (RFC 5322 4.5.3)
    "From: alice@example.com\r\nFrom : eve@evil.example\r\n",
    "From: alice@example.com\r\nnot a header\r\nFrom: eve@evil.example\r\n",
    "From eve@evil.example Tue Jul  1 10:00:00 2025\r\nFrom: alice@example.com\r\n",  # mbox From_ line
    " folded onto nothing\r\nFrom: alice@example.com\r\n",
], ids=["obs-from-first", "obs-from-last", "stray-line", "mbox-from-line", "leading-fold"])
async def test_header_lines_that_parsers_read_differently_are_refused(h, header_block):
    """A recipient's software may show a From: the relay's own parser skipped."""
    client, _ = await alice_session(h)
    await client.mail(ALICE)
    await client.rcpt(BOB)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(f"{header_block}Subject: x\r\n\r\nbody\r\n".encode())
    assert (refused.value.code, refused.value.message) == (
        550, "5.6.0 Message header has a line that is not a header field")
    await client.quit()
    await assert_sink_stays_at(h, 0)


async def test_folded_and_8bit_from_headers_are_accepted(h):
    client, _ = await alice_session(h)
    await client.sendmail(ALICE, [BOB], b"From: =?utf-8?q?J=C3=B6rg?=\r\n <alice@example.com>\r\n"
                                        b"Subject: folded\r\n\r\nx\r\n")
    await client.sendmail(ALICE, [BOB], "From: Jörg <alice@example.com>\r\nSubject: 8bit\r\n\r\n"
                                        "x\r\n".encode())
    await client.quit()
    received = await h.sink.wait_for(2)
    assert sorted(m.text.split("Subject: ")[1].split("\r\n")[0] for m in received) == ["8bit", "folded"]


async def test_message_without_from_header_is_refused(h):
    client, _ = await alice_session(h)
    await client.mail(ALICE)
    await client.rcpt(BOB)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(f"To: {BOB}\r\nSubject: no from\r\n\r\nbody\r\n".encode())
    assert (refused.value.code, refused.value.message) == (550, "5.6.0 Message has no From: header")
    await client.quit()
    await assert_sink_stays_at(h, 0)


async def test_foreign_header_from_is_delivered_when_the_check_is_off(relay_with):
    async with relay_with(server="check_header_from = false") as h:
        client, _ = await alice_session(h)
        # the envelope sender is still checked...
        assert response(await client.execute_command(b"MAIL", b"FROM:<eve@evil.example>")) == split(
            replies.SENDER_NOT_OWNED)
        # ...but the header is not
        await client.sendmail(ALICE, [BOB], message("Newsletter <news@elsewhere.example>"))
        await client.quit()
        (received,) = await h.sink.wait_for(1)
        assert received.mail_from == ALICE
        assert "From: Newsletter <news@elsewhere.example>" in received.text


# ------------------------------------------------------------------ size


async def test_size_is_advertised_and_enforced_at_mail_and_at_data(relay_with):
    async with relay_with(server="max_message_size = 10000") as h:
        client, _ = await alice_session(h)
        assert client.supports_extension("size")
        assert client.esmtp_extensions["size"] == "10000"

        code, text = await client.execute_command(b"MAIL", f"FROM:<{ALICE}>".encode(), b"SIZE=20000")
        assert (code, text) == split(replies.TOO_BIG)
        # aiosmtplib declares SIZE itself: a big message is refused before any data is sent
        big = message(body="big") + (b"y" * 76 + b"\r\n") * 200
        assert len(big) > 15000
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail(ALICE, [BOB], big)
        assert (refused.value.code, refused.value.message) == split(replies.TOO_BIG)

        # a client that does not declare SIZE is stopped at the end of DATA
        await client.mail(ALICE)
        await client.rcpt(BOB)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.data(big)
        assert (refused.value.code, refused.value.message) == split(replies.TOO_BIG)

        # the session is still usable: a small message goes through
        await client.sendmail(ALICE, [BOB], message(subject="small"))
        await client.quit()
        (received,) = await h.sink.wait_for(1)
        assert "Subject: small" in received.text
        await assert_sink_stays_at(h, 1)


async def test_a_message_of_exactly_the_limit_is_accepted(relay_with):
    async with relay_with(server="max_message_size = 10000") as h:
        client, _ = await alice_session(h)
        head = message(subject="fits", body="")
        lines, rest = divmod(10000 - len(head), 100)
        body = (b"z" * 98 + b"\r\n") * lines + b"z" * (rest - 2) + b"\r\n"
        assert len(head + body) == 10000
        await client.sendmail(ALICE, [BOB], head + body)
        await client.quit()
        (received,) = await h.sink.wait_for(1)
        assert received.data.endswith(body)


# ------------------------------------------------------------------ recipients


async def test_third_recipient_over_max_recipients_is_refused_but_the_message_goes_to_two(relay_with):
    async with relay_with(server="max_recipients = 2") as h:
        client, _ = await alice_session(h)
        await client.mail(ALICE)
        assert response(await client.rcpt("one@example.net")) == split(replies.RCPT_OK)
        assert response(await client.rcpt("two@example.net")) == split(replies.RCPT_OK)
        code, text = await client.execute_command(b"RCPT", b"TO:<three@example.net>")
        assert (code, text) == split(replies.TOO_MANY_RECIPIENTS)
        assert split(replies.TOO_MANY_RECIPIENTS) == (452, "4.5.3 Too many recipients for one message")
        resp = await client.data(message())
        assert resp.code == 250
        assert re.fullmatch(r"2\.0\.0 OK queued as [0-9a-f]+", resp.message)
        await client.quit()
        (received,) = await h.sink.wait_for(1)
        assert received.rcpt_tos == ["one@example.net", "two@example.net"]
        await assert_sink_stays_at(h, 1)


# ------------------------------------------------------------------ rate limits


async def mail_replies(client, count: int) -> list[tuple[int, str]]:
    answers = []
    for _ in range(count):
        answers.append(response(await client.execute_command(b"MAIL", f"FROM:<{ALICE}>".encode())))
        await client.rset()
    return answers


async def test_rate_limit_per_key(relay_with):
    async with relay_with(server="rate_per_minute = 2") as h:
        client, _ = await alice_session(h)
        ok, limited = split(replies.MAIL_OK), split(replies.RATE_LIMITED)
        assert limited == (451, "4.7.1 Sending rate limit for this auth key exceeded, try again later")
        assert await mail_replies(client, 3) == [ok, ok, limited]
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail(ALICE, [BOB], message())
        assert (refused.value.code, refused.value.message) == limited
        await client.quit()

        # another key of the same mailbox has its own allowance
        other = await h.login(ALICE, await h.key(ALICE, name="second key"))
        await other.sendmail(ALICE, [BOB], message(subject="other key"))
        await other.quit()
        (received,) = await h.sink.wait_for(1)
        assert "Subject: other key" in received.text


async def test_rate_limit_is_shared_by_the_sessions_of_one_key(relay_with):
    async with relay_with(server="rate_per_minute = 2") as h:
        await h.mailbox(ALICE)
        secret = await h.key(ALICE)
        first = await h.login(ALICE, secret)
        ok, limited = split(replies.MAIL_OK), split(replies.RATE_LIMITED)
        assert await mail_replies(first, 2) == [ok, ok]
        await first.quit()
        second = await h.login(ALICE, secret)
        assert await mail_replies(second, 1) == [limited]
        await second.quit()


async def test_a_key_with_its_own_rate_limit(relay_with):
    async with relay_with(server="rate_per_minute = 2") as h:
        client, _ = await alice_session(h, rate_limit=5)
        ok, limited = split(replies.MAIL_OK), split(replies.RATE_LIMITED)
        assert await mail_replies(client, 6) == [ok] * 5 + [limited]
        await client.quit()
        # a key of another mailbox is unaffected
        await h.mailbox("carol@example.com")
        carol = await h.login("carol@example.com", await h.key("carol@example.com"))
        code, _ = await carol.execute_command(b"MAIL", b"FROM:<carol@example.com>")
        assert code == 250
        await carol.quit()


# ------------------------------------------------------------------ added headers


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
async def test_received_header_names_relay_tls_and_key_id_but_never_the_secret(h, implicit):
    client, secret = await alice_session(h, implicit=implicit)
    key_id = secret[4:16]
    await client.sendmail(ALICE, [BOB], message())
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    assert received.data.startswith(b"Received: ")
    trace = headers_of(received.data).get_all("Received")
    assert len(trace) == 1
    (line,) = trace
    unfolded = " ".join(line.split())
    assert "by relay.test" in unfolded
    assert "with ESMTPSA" in unfolded
    assert re.search(r"\bTLSv1\.[23]\b", unfolded), unfolded
    assert f"auth key {key_id}" in unfolded
    assert "[127.0.0.1]" in unfolded
    assert secret not in received.text
    assert secret[17:] not in received.text  # not even the secret part without the id


async def test_message_id_and_date_are_added_when_missing(h):
    client, _ = await alice_session(h)
    await client.sendmail(ALICE, [BOB], message())
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    parsed = headers_of(received.data)
    (message_id,) = parsed.get_all("Message-ID")
    (date,) = parsed.get_all("Date")
    assert re.fullmatch(r"<[0-9a-f]+@relay\.test>", message_id), message_id
    sent = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(sent - time.time()) < 60


async def test_message_id_and_date_given_by_the_client_are_kept_once(h):
    client, _ = await alice_session(h)
    given_id = "<original.123@client.example>"
    given_date = "Tue, 01 Jul 2025 10:00:00 +0200"
    await client.sendmail(ALICE, [BOB], message(extra=f"Message-ID: {given_id}\r\nDate: {given_date}\r\n"))
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    parsed = headers_of(received.data)
    assert parsed.get_all("Message-ID") == [given_id]
    assert parsed.get_all("Date") == [given_date]


async def test_header_names_are_recognised_in_any_case(h):
    client, _ = await alice_session(h)
    await client.sendmail(ALICE, [BOB], message(extra="message-id: <lower@client.example>\r\nDATE: "
                                                       "Tue, 01 Jul 2025 10:00:00 +0200\r\n"))
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    parsed = headers_of(received.data)
    assert parsed.get_all("Message-ID") == ["<lower@client.example>"]
    assert len(parsed.get_all("Date")) == 1


# ------------------------------------------------------------------ enhanced status codes


async def test_aiosmtpd_replies_carry_enhanced_codes(h):
    client, _ = await alice_session(h)

    async def say(*words: bytes) -> tuple[int, str]:
        return response(await client.execute_command(*words))

    assert await say(b"RCPT", f"TO:<{BOB}>".encode()) == (503, "5.5.1 Error: need MAIL command")
    assert await say(b"MAIL", f"FROM:<{ALICE}>".encode()) == split(replies.MAIL_OK)
    assert await say(b"MAIL", f"FROM:<{ALICE}>".encode()) == (503, "5.5.1 Error: nested MAIL command")
    assert await say(b"DATA") == (503, "5.5.1 Error: need RCPT command")
    assert await say(b"FROB", b"nicate") == (500, '5.5.2 Error: command "FROB" not recognized')
    assert await say(b"NOOP") == (250, "2.0.0 OK")
    assert await say(b"RSET") == (250, "2.0.0 OK")
    assert await say(b"AUTH", b"PLAIN") == (503, "5.5.1 Already authenticated")
    assert response(await client.quit()) == (221, "2.0.0 Bye")


async def test_greeting_and_ehlo_stay_without_enhanced_codes(h):
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, start_tls=False, timeout=5)
    greeting = await client.connect()
    assert (greeting.code, greeting.message) == (220, "relay.test keyrelay ESMTP")
    ehlo = await client.ehlo()
    assert ehlo.message.splitlines()[0] == "relay.test"
    assert response(await client.execute_command(b"STARTTLS", b"now")) == (501, "5.5.4 Syntax: STARTTLS")
    client.close()


# ------------------------------------------------------------------ connections


async def first_line(host: str, port: int, **tls) -> tuple[bytes, bytes]:
    """The greeting of a fresh connection and whatever follows before the relay closes or
    goes quiet."""
    reader, writer = await asyncio.open_connection(host, port, **tls)
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        try:
            rest = await asyncio.wait_for(reader.read(), 0.3)
        except TimeoutError:
            rest = b"<still open>"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return line, rest


async def test_connection_cap(relay_with, caplog):
    async with relay_with(server="max_connections = 2") as h:
        full = f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode()
        assert full == b"421 4.7.0 Too many connections, try again later\r\n"
        one = await h.client()
        two = await h.client(implicit=True)
        # over the cap: 421 as the greeting, then the relay hangs up
        assert await first_line("127.0.0.1", h.port) == (full, b"")
        # the cap is for all listeners together
        assert await first_line("127.0.0.1", h.implicit_port, ssl=h.tls, server_hostname="127.0.0.1") == (
            full, b"")
        # the sessions under the cap are unaffected
        assert response(await one.noop()) == (250, "2.0.0 OK")

        await one.quit()
        deadline = time.monotonic() + 3
        while True:
            line, _ = await first_line("127.0.0.1", h.port)
            if line.startswith(b"220 ") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert line == b"220 relay.test keyrelay ESMTP\r\n"
        three = await h.client()
        assert response(await three.noop()) == (250, "2.0.0 OK")
        await three.quit()
        await two.quit()
    # refusing a connection is routine, not an error with a traceback in the relay's log
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_one_session_sends_several_messages(h):
    client, _ = await alice_session(h)
    for number in range(5):
        _, reply = await client.sendmail(ALICE, [f"rcpt{number}@example.net"], message(subject=f"n{number}"))
        assert re.fullmatch(r"2\.0\.0 OK queued as [0-9a-f]+", reply), reply
    await client.quit()
    received = await h.sink.wait_for(5)
    assert sorted(m.rcpt_tos[0] for m in received) == [f"rcpt{n}@example.net" for n in range(5)]
    for m in received:
        number = m.rcpt_tos[0][4]
        assert f"Subject: n{number}\r\n" in m.text
    await assert_sink_stays_at(h, 5)


async def test_recipient_with_control_characters_is_refused_at_rcpt(h):
    from tests.test_smuggling import alice

    session = await alice(h)
    assert (await session.command(b"MAIL FROM:<alice@example.com>")).startswith("250 ")
    for address in (b"bob\x01@example.net", b"bob@exa\x7fmple.net", b"bob@"):
        reply = await session.command(b"RCPT TO:<" + address + b">")
        assert reply.startswith(("553 5.1.3 ", "501 5.5.4 ")), (address, reply)
    assert (await session.command(b"RCPT TO:<bob@example.net>")).startswith("250 ")
    await session.close()
