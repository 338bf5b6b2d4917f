"""A pooled, already-authenticated connection stops working within a second of an
admin revoking its key or suspending its mailbox with the `keystore` CLI."""

from __future__ import annotations

import asyncio
import json
import time

import aiosmtplib
import pytest

from keystore.models import Identity
from keystore.store import KeyStore
from relay.auth import Authenticator, FailureLimiter
from tests.support.procs import keystore_cli
from tests.support.refusals import mail_refused_within, refused_within

MESSAGE = b"From: alice@example.com\r\n\r\nhi\r\n"


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
    assert (code, message.partition(": ")[0]) in (
        (535, "5.7.8 Authentication credentials invalid"), (554, "5.7.8 Message refused"))
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
    assert code in (535, 554) and "this auth key has expired" in message
    client.close()


async def test_rotation_without_grace_ends_sessions_on_the_old_secret(relay_with):
    async with relay_with(auth='recheck_interval = "0s"') as h:
        await h.mailbox("alice@example.com")
        record, old = await h.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="t")
        client = await h.login("alice@example.com", old)
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)

        result = await asyncio.to_thread(keystore_cli, h.config_path, "key", "rotate", record.id, "--json")
        assert result.returncode == 0, result.stderr
        new = json.loads(result.stdout)["secret"]

        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:  # the very next MAIL FROM
            await client.mail("alice@example.com")
        assert (refused.value.code, refused.value.message) == (
            535, "5.7.8 Authentication credentials invalid: this auth key's secret has been rotated")
        client.close()
        client = await h.login("alice@example.com", new)
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        client.close()
        await h.sink.wait_for(2)


async def test_a_rotation_grace_keeps_old_sessions_until_it_ends(relay_with):
    async with relay_with(auth='recheck_interval = "0s"') as h:
        await h.mailbox("alice@example.com")
        record, old = await h.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="t")
        on_old = await h.login("alice@example.com", old)
        _, new = await h.relay.store.rotate_key(record.id, grace=1.5, actor="t")
        on_new = await h.login("alice@example.com", new)

        await on_old.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)  # within the grace
        code, message = await mail_refused_within(on_old, 5)
        assert (code, message) == (
            535, "5.7.8 Authentication credentials invalid: this auth key's secret has been rotated")
        await on_new.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)  # goes on
        on_old.close()
        on_new.close()
        await h.sink.wait_for(2)


async def test_a_fresh_recheck_does_not_trust_the_cache(tmp_path):
    """The end of DATA asks the keystore itself, however recently MAIL FROM did."""
    store = await KeyStore.open(tmp_path / "keystore.db", tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("alice@example.com", workspace="w", actor="t")
        record, secret = await store.create_key(mailbox="alice@example.com", name="crm", actor="t")
        authenticator = Authenticator(store, FailureLimiter(10, 60), recheck_interval=3600)
        identity = (await authenticator.login("alice@example.com", secret, "192.0.2.1")).identity
        assert isinstance(identity, Identity)
        await store.revoke_key(record.id, actor="t")
        assert await authenticator.recheck(identity) == identity  # cached
        refusal = await authenticator.recheck(identity, fresh=True)
        assert refusal == "535 5.7.8 Authentication credentials invalid: this auth key has been revoked"
        assert await authenticator.recheck(identity) == refusal  # and the cache learnt it
    finally:
        await store.close()


async def test_ending_a_rotation_grace_early_retires_the_old_secret_at_once(relay_with):
    """`key rotate ID --end-grace`: every caller has the new secret, so the old one stops
    now rather than at the end of its grace: old sessions end at their next MAIL, new
    logins with it fail, the new secret carries on; audited; a second time is refused."""
    async with relay_with(auth='recheck_interval = "0s"') as h:
        await h.mailbox("alice@example.com")
        record, old = await h.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="t")
        on_old = await h.login("alice@example.com", old)
        _, new = await h.relay.store.rotate_key(record.id, grace=3600, actor="t")
        on_new = await h.login("alice@example.com", new)
        await on_old.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)  # within the grace

        end_grace = ("key", "rotate", record.id, "--end-grace")
        ended = await asyncio.to_thread(keystore_cli, h.config_path, *end_grace)
        assert ended.returncode == 0, ended.stderr
        assert ended.stdout.strip() == (
            f"key {record.id} ('crm'): the previous secret no longer works (grace ended)")

        code, message = await mail_refused_within(on_old, 5)
        assert (code, message) == (
            535, "5.7.8 Authentication credentials invalid: this auth key's secret has been rotated")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await h.login("alice@example.com", old)
        await on_new.sendmail("alice@example.com", ["carol@example.net"], MESSAGE)
        await h.sink.wait_for(2)
        on_old.close()
        on_new.close()

        again = await asyncio.to_thread(keystore_cli, h.config_path, *end_grace)
        assert again.returncode == 1
        assert "has no rotation grace running" in again.stderr
        both = await asyncio.to_thread(keystore_cli, h.config_path, *end_grace, "--grace", "1h")
        assert both.returncode == 2 and "not allowed with argument" in both.stderr
        events = [e.action for e in await h.relay.store.audit_events(key_id=record.id)]
        assert events.count("key.end_grace") == 1
