"""A pooled, already-authenticated connection stops working within a second of an
admin revoking its key or suspending its mailbox with the `keystore` CLI."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from tests.support.procs import keystore_cli

MESSAGE = b"From: alice@example.com\r\n\r\nhi\r\n"


async def refused_within(client, seconds: float) -> tuple[int, str, float]:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        except aiosmtplib.SMTPSenderRefused as exc:
            return exc.code, exc.message, time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"still sending {seconds}s after the CLI command")


@pytest.mark.parametrize(
    ("command", "reason"),
    [(("key", "revoke", "{id}"), "revoked"), (("key", "disable", "{id}"), "disabled"),
     (("mailbox", "suspend", "alice@example.com"), "suspended")],
)
async def test_open_session_is_cut_off_by_the_cli(h, command, reason):
    await h.mailbox("alice@example.com")
    record, secret = await h.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="t")
    client = await h.login("alice@example.com", secret)
    await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)

    args = [part.format(id=record.id) for part in command]
    result = await asyncio.to_thread(keystore_cli, h.config_path, *args)
    assert result.returncode == 0, result.stderr

    code, message, after = await refused_within(client, 1.0)
    assert code == 535
    assert message.startswith("5.7.8 Authentication credentials invalid: ")
    assert reason in message
    client.close()
    await h.sink.wait_for(1)  # the message sent before the change was delivered


async def test_expiry_during_an_open_session(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com", expires=time.time() + 0.6)
    client = await h.login("alice@example.com", secret)
    await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
    await asyncio.sleep(0.6)
    code, message, _ = await refused_within(client, 1.0)
    assert (code, "expired" in message) == (535, True)
    client.close()
