"""Header sender fields a reader sees, as a client meets them: an address shown in a display
name or comment of From:/Sender: must be the mailbox or an alias however it is dressed up
(encoded words, fullwidth or invisible characters), and Resent-From:/Resent-Sender: follow
the same ownership rule as From:/Sender:."""

from __future__ import annotations

import aiosmtplib
import pytest

from relay import replies
from tests.test_submission_policy import ALICE, BOB, alice_session, assert_sink_stays_at, split


async def refused_with(h, header_block: bytes, *, aliases=()) -> tuple[int, str]:
    """Send one message with `header_block` on top; the end-of-data reply it got refused with."""
    client, _ = await alice_session(h, aliases=aliases)
    await client.mail(ALICE)
    await client.rcpt(BOB)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await client.data(header_block + b"To: bob@example.net\r\nSubject: x\r\n\r\nbody\r\n")
    await client.quit()
    await assert_sink_stays_at(h, 0)
    return refused.value.code, refused.value.message


# ------------------------------------------------------------------ display names


@pytest.mark.parametrize("from_field", [
    b'From: "other@example.com" <alice@example.com>',
    b"From: =?utf-8?b?b3RoZXJAZXhhbXBsZS5jb20=?= <alice@example.com>",  # base64 encoded word
    b"From: =?utf-8?q?Support_=3Ceve=40evil=2Eexample=3E?= <alice@example.com>",  # "Support <eve@...>"
    b"From: =?utf-8?q?eve?= =?utf-8?q?=40evil.example?= <alice@example.com>",  # split over two words
    b'From: "=?utf-8?b?ZXZlQGV2aWwuZXhhbXBsZQ==?=" <alice@example.com>',  # encoded word in quotes
    b"From: =?utf-7?q?eve+AEA-evil.example?= <alice@example.com>",  # UTF-7 "@"
    b"From: =?UTF-8?Q?eve=E2=80=8B=40evil.example?= <alice@example.com>",  # zero-width space
    '"eve＠evil.example" <alice@example.com>'.join(["From: ", ""]).encode(),  # fullwidth at, 8-bit
    b"From: alice@example.com (eve@evil.example)",  # a comment some readers show as the name
    b"From: alice@example.com\r\nSender: \"eve@evil.example\" <alice@example.com>",
    b'From: "alice@example.com@evil.example" <alice@example.com>',
    b'From: "Support team\r\n eve@evil.example" <alice@example.com>',  # folded
], ids=["quoted", "b-word", "q-word-angle", "split-words", "word-in-quotes", "utf-7",
        "zero-width", "fullwidth-at", "comment", "sender", "double-at", "folded"])
async def test_a_display_name_showing_another_address_is_refused(h, from_field):
    assert await refused_with(h, from_field + b"\r\n") == split(replies.HEADER_FROM_NAME_NOT_OWNED)


@pytest.mark.parametrize("from_field", [
    b'From: "alice@example.com" <eve@evil.example>',
    b"From: eve@evil.example <alice@example.com>",  # an unquoted "name" with @ is an address
    b"From: =?utf-8?q?eve@evil.example?= <alice@example.com>",  # so is a bare @ in an encoded word
    b"From:",
    b"From: (Alice)",
    b"From: alice@example.com\r\nSender:",
    b"From: alice@example.com " + b"\r\n ".join([b"(x" * 200] * 10 + [b")" * 400] * 5),  # nested 2000 deep
], ids=["foreign-address", "unquoted-name", "bare-at-in-word", "empty", "comment-only", "empty-sender",
        "nested-comments"])
async def test_a_foreign_or_missing_address_keeps_its_own_reply(h, from_field):
    """The address itself is checked first: a foreign one or none at all (an empty field
    shows the reader nobody) is refused with the reply about the address."""
    assert await refused_with(h, from_field + b"\r\n") == split(replies.HEADER_FROM_NOT_OWNED)


async def test_an_encoded_word_that_cannot_be_decoded_is_refused(h):
    """A lenient reader may still show something in it; we cannot tell what."""
    assert await refused_with(h, b"From: =?utf-8?b?b3Rob?= <alice@example.com>\r\n") == split(
        replies.HEADER_UNDECODABLE)


async def test_ordinary_display_names_are_delivered(h):
    froms = [
        b'"Jane Doe" <alice@example.com>',
        b'"alice@example.com" <alice@example.com>',
        b"ALICE@Example.COM <alice@example.com>",
        b"=?utf-8?q?alice=40example.com?= <alice@example.com>",
        b'"sales@example.com" <alice@example.com>',  # an alias of the same mailbox
        b'"Jane @ Acme" <alice@example.com>',
        b"\"Write to 'alice@example.com'!\" <alice@example.com>",
        "Jörg Müller <alice@example.com>".encode(),
        b"=?iso-8859-1?q?J=F6rg?= <alice@example.com>",
        b"alice@example.com (Alice at work)",
        b'"C:\\\\users" <alice@example.com>',
        b'"Jane Doe (@jane, jane@)" <alice@example.com>',  # handles and a stray "@" are no address
        b'"Alice, Head of\r\n Sales" <alice@example.com>',  # a quoted name folded over two lines
    ]
    client, _ = await alice_session(h, aliases=["sales@example.com"])
    for number, from_field in enumerate(froms):
        await client.sendmail(ALICE, [BOB], b"From: " + from_field + b"\r\nSubject: %d\r\n\r\nx\r\n" % number)
    await client.quit()
    received = await h.sink.wait_for(len(froms))
    assert sorted(m.text.split("Subject: ")[1].split("\r\n")[0] for m in received) == sorted(
        str(n) for n in range(len(froms)))


async def test_a_long_display_name_is_checked_quickly(h):
    """48,000 characters shown as one word (encoded words are joined when decoded): the
    check stays linear, so the reply comes within the client's timeout."""
    words = b"\r\n ".join([b"=?utf-8?q?" + b"a" * 60 + b"?="] * 800)
    client, _ = await alice_session(h)
    await client.sendmail(ALICE, [BOB], b"From: " + words + b"\r\n <alice@example.com>\r\n"
                                        b"Subject: long\r\n\r\nx\r\n")
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    assert "Subject: long" in received.text


# ------------------------------------------------------------------ Resent-*


@pytest.mark.parametrize("resent_fields", [
    b"Resent-From: eve@evil.example",
    b"Resent-From: alice@example.com\r\nResent-Sender: eve@evil.example",
    b'Resent-From: "eve@evil.example" <alice@example.com>',
    b"Resent-From: =?utf-8?q?eve=40evil.example?= <alice@example.com>",
    b"Resent-From:",
], ids=["resent-from", "resent-sender", "resent-display-name", "resent-encoded-name", "resent-empty"])
async def test_resent_fields_not_owned_are_refused(h, resent_fields):
    block = b"From: alice@example.com\r\n" + resent_fields + b"\r\n"
    assert await refused_with(h, block) == split(replies.HEADER_RESENT_NOT_OWNED)


async def test_resent_fields_of_the_mailbox_or_an_alias_are_delivered(h):
    client, _ = await alice_session(h, aliases=["sales@example.com"])
    await client.sendmail(ALICE, [BOB], b"From: alice@example.com\r\n"
                                        b"Resent-From: Sales <sales@example.com>\r\n"
                                        b"Resent-Sender: \"Alice\" <ALICE@example.com>\r\n"
                                        b"Subject: resent\r\n\r\nx\r\n")
    await client.quit()
    (received,) = await h.sink.wait_for(1)
    assert "Resent-From: Sales <sales@example.com>" in received.text


async def test_resent_fields_are_not_checked_when_the_check_is_off(relay_with):
    async with relay_with(server="check_header_from = false") as h:
        client, _ = await alice_session(h)
        await client.sendmail(ALICE, [BOB], b"From: alice@example.com\r\nResent-From: eve@evil.example\r\n"
                                            b"Subject: x\r\n\r\nx\r\n")
        await client.quit()
        (received,) = await h.sink.wait_for(1)
        assert "Resent-From: eve@evil.example" in received.text
