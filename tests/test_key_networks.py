"""Per-key client networks (`keystore key create --allow-from CIDR`): a key works only
from the networks listed, a right secret from elsewhere gets the reason (a wrong one still
gets the plain refusal), those refusals count against the key only, and a keystore made
before the column existed is upgraded with its keys working from anywhere as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import aiosmtplib
import pytest

from keystore import keys
from keystore.schema import MIGRATIONS, run_migrations
from keystore.store import KeyStore
from tests.conftest import running_relay
from tests.support.procs import keystore_cli
from tests.support.refusals import refused_within
from tests.support.relayrun import Harness, write_config

INVALID = "5.7.8 Authentication credentials invalid"
NOT_ALLOWED = f"{INVALID}: this auth key is not allowed from this address"
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


async def cli(h: Harness, *args: str):
    return await asyncio.to_thread(keystore_cli, h.config_path, *args)


async def cli_key(h: Harness, mailbox: str, *allow_from: str) -> tuple[str, str]:
    """A key made as an operator makes one: the CLI. Returns (id, secret)."""
    options = [part for cidr in allow_from for part in ("--allow-from", cidr)]
    result = await cli(h, "key", "create", "--mailbox", mailbox, "--name", "CRM", *options, "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    return created["id"], created["secret"]


async def auth_reply(client: aiosmtplib.SMTP, username: str, secret: str) -> tuple[int, str]:
    try:
        response = await client.auth_plain(username, secret)  # one check (login() tries two)
    except aiosmtplib.SMTPAuthenticationError as exc:
        return exc.code, exc.message
    except aiosmtplib.SMTPResponseException as exc:  # 421: the throttle's answer
        return exc.code, exc.message
    return response.code, response.message


async def attempt(h: Harness, username: str, secret: str, source: str) -> tuple[int, str]:
    client = await h.client(source=source)
    try:
        return await auth_reply(client, username, secret)
    finally:
        client.close()


async def test_allowed_network_logs_in_other_addresses_get_the_reason(h):
    await h.mailbox("alice@example.com")
    _, secret = await cli_key(h, "alice@example.com", "127.0.0.1/32")

    client = await h.client(source="127.0.0.1")
    assert await auth_reply(client, "alice@example.com", secret) == (235, "2.7.0 Authentication successful")
    await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
    await client.quit()
    await h.sink.wait_for(1)

    assert await attempt(h, "alice@example.com", secret, "127.0.0.2") == (535, NOT_ALLOWED)
    # without the right secret nothing says the key is bound to networks: no oracle
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert await attempt(h, "alice@example.com", wrong, "127.0.0.2") == (535, INVALID)

    # the refusal with the right secret is the key's last failed use; the wrong secret is
    # not (it proves nothing about the key's holder)
    key_id = keys.parse_key(secret).key_id
    await h.relay.store.flush_uses()
    shown = (await cli(h, "key", "show", key_id)).stdout
    assert "last client:            127.0.0.1\n" in shown
    assert "last failed use:" in shown and shown.split("last failed use:")[1].split("\n")[0].endswith(
        " from 127.0.0.2 (not allowed from)")

async def test_network_refusals_count_against_that_key_only(relay_with):
    async with relay_with(auth="max_failures = 2") as h:
        await h.mailbox("alice@example.com")
        await h.mailbox("bob@example.com")
        _, alice = await cli_key(h, "alice@example.com", "127.0.0.1/32")
        _, bob = await cli_key(h, "bob@example.com")

        for _ in range(2):
            assert await attempt(h, "alice@example.com", alice, "127.0.0.2") == (535, NOT_ALLOWED)
        code, _ = await attempt(h, "alice@example.com", alice, "127.0.0.2")
        assert code == 421  # that key from that address has used its budget
        # another mailbox's key from the same address, and the key from its own network,
        # are not held back by it
        assert (await attempt(h, "bob@example.com", bob, "127.0.0.2"))[0] == 235
        assert (await attempt(h, "alice@example.com", alice, "127.0.0.1"))[0] == 235
        registry = h.relay.metrics.registry
        assert registry.get_sample_value(
            "keyrelay_auth_attempts_total", {"outcome": "not_allowed_from"}) == 2


def relay_also_on_ipv6(folder, sink):
    """The relay with a second STARTTLS listener on [::1]."""
    return running_relay(folder, sink, edit=lambda text: text.replace(
        'submission = ["127.0.0.1:0"]', 'submission = ["127.0.0.1:0", "[::1]:0"]'))


async def test_ipv6_network(tmp_path, sink):
    async with relay_also_on_ipv6(tmp_path, sink) as h:
        v6_port = next(listener.port for listener in h.relay.listeners
                       if listener.kind == "submission" and listener.host == "::1")
        await h.mailbox("alice@example.com")
        _, secret = await cli_key(h, "alice@example.com", "::1/128")

        client = aiosmtplib.SMTP(hostname="::1", port=v6_port, start_tls=True, tls_context=h.tls,
                                 timeout=5)
        await client.connect()
        await client.ehlo()
        assert await auth_reply(client, "alice@example.com", secret) == (
            235, "2.7.0 Authentication successful")
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        await h.sink.wait_for(1)

        assert await attempt(h, "alice@example.com", secret, "127.0.0.1") == (535, NOT_ALLOWED)


async def test_ipv4_mapped_client_address_matches_an_ipv4_network(tmp_path):
    """What a dual-stack listener reports for an IPv4 client (::ffff:a.b.c.d)."""
    store = await KeyStore.open(tmp_path / "ks.db", tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("alice@example.com", workspace="w", actor="t")
        _, secret = await store.create_key(mailbox="alice@example.com", name="crm", actor="t",
                                           allow_from=["192.0.2.0/24"])
        ok = await store.authenticate("alice@example.com", secret, "::ffff:192.0.2.9")
        assert ok.mailbox == "alice@example.com"
        refused = await store.authenticate("alice@example.com", secret, "::ffff:198.51.100.9")
        assert refused.value == "not_allowed_from"
    finally:
        await store.close()


@pytest.mark.parametrize("cidr", ["10.0.0.1/24", "10.0.0.0/33", "not-a-network", "2001:db8::/129", ""])
async def test_malformed_network_is_refused_by_the_cli(h, cidr):
    await h.mailbox("alice@example.com")
    result = await cli(h, "key", "create", "--mailbox", "alice@example.com", "--name", "CRM",
                       "--allow-from", "192.0.2.0/24", "--allow-from", cidr)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith(f"keystore: allow-from {cidr!r} is not a network in CIDR notation")
    listed = await cli(h, "key", "list", "--json")
    assert json.loads(listed.stdout) == []  # nothing was created


async def test_key_show_and_list_give_the_networks(h):
    await h.mailbox("alice@example.com")
    key_id, _ = await cli_key(h, "alice@example.com", "192.0.2.0/24", "2001:DB8::/48", "198.51.100.7")
    open_id, _ = await cli_key(h, "alice@example.com")

    shown = await cli(h, "key", "show", key_id)
    assert "allowed from:           192.0.2.0/24 2001:db8::/48 198.51.100.7/32\n" in shown.stdout
    shown = await cli(h, "key", "show", open_id)
    assert "allowed from:           anywhere\n" in shown.stdout

    listed = {k["id"]: k for k in json.loads((await cli(h, "key", "list", "--json")).stdout)}
    assert listed[key_id]["allow_from"] == ["192.0.2.0/24", "2001:db8::/48", "198.51.100.7/32"]
    assert listed[open_id]["allow_from"] == []
    shown_json = json.loads((await cli(h, "key", "show", key_id, "--json")).stdout)
    assert shown_json["allow_from"] == listed[key_id]["allow_from"]


async def test_key_update_allow_from_takes_effect_on_open_sessions(h):
    """`key update --allow-from`: an open session is judged again at MAIL FROM with the
    address it logged in from; `--clear allow-from` lets the key in from anywhere again."""
    await h.mailbox("alice@example.com")
    key_id, secret = await cli_key(h, "alice@example.com")
    inside = await h.login("alice@example.com", secret, source="127.0.0.1")
    outside = await h.login("alice@example.com", secret, source="127.0.0.2")

    updated = await cli(h, "key", "update", key_id, "--allow-from", "127.0.0.1/32")
    assert updated.returncode == 0, updated.stderr
    assert updated.stdout == f"key {key_id} ('CRM') updated: allow-from 127.0.0.1/32\n"

    _, message, _ = await refused_within(outside, 2, message=MESSAGE)
    assert message.endswith("this auth key is not allowed from this address")
    await inside.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
    await inside.quit()
    outside.close()
    assert await attempt(h, "alice@example.com", secret, "127.0.0.2") == (535, NOT_ALLOWED)

    cleared = await cli(h, "key", "update", key_id, "--clear", "allow-from")
    assert cleared.stdout == f"key {key_id} ('CRM') updated: allow-from cleared\n"
    assert (await attempt(h, "alice@example.com", secret, "127.0.0.2"))[0] == 235


async def test_keystore_from_the_previous_version_is_upgraded(tmp_path, sink):
    """A keystore made before allow-from existed: its keys keep working from anywhere."""
    write_config(tmp_path, sink.port)
    keys.create_pepper(tmp_path / "pepper")
    pepper = keys.load_pepper(tmp_path / "pepper")
    key_id = keys.generate_key_id()
    full, secret = keys.generate_key(key_id)
    with sqlite3.connect(tmp_path / "keystore.db") as db:
        run_migrations(db, MIGRATIONS[:1], what="keystore")
        db.execute("INSERT INTO workspace (id, name, key_limit, created) VALUES (1, 'default', 100, 0)")
        db.execute("INSERT INTO mailbox (id, address, workspace_id, created) "
                   "VALUES (1, 'alice@example.com', 1, 0)")
        db.execute("INSERT INTO auth_key (id, name, workspace_id, mailbox_id, permissions, status, "
                   "created, secret_hash) VALUES (?, 'old', 1, 1, 'email.send', 'active', 0, ?)",
                   (key_id, keys.hash_secret(pepper, key_id, secret)))
    db.close()

    shown = await asyncio.to_thread(keystore_cli, tmp_path / "relay.toml", "key", "show", key_id)
    assert shown.returncode == 0, shown.stderr
    assert "allowed from:           anywhere\n" in shown.stdout
    with contextlib.closing(sqlite3.connect(tmp_path / "keystore.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)

    async with running_relay(tmp_path, sink) as h:
        assert (await attempt(h, "alice@example.com", full, "127.0.0.2"))[0] == 235
        _, bound = await cli_key(h, "alice@example.com", "127.0.0.1/32")
        assert await attempt(h, "alice@example.com", bound, "127.0.0.2") == (535, NOT_ALLOWED)
