"""The keystore on PostgreSQL (issue 12), as operators and relays meet it: the `keystore`
CLI on a config whose [keystore] has a url, the notifications every relay listens to, two
keystores (two nodes) on one database, and a server that goes away under a running relay.
The rules themselves run on both engines in test_keystore_store.py.

Real PostgreSQL throughout (tests/support/postgres.py): the session's server with a
database per test, or a server of the test's own where the test stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import psycopg
import pytest

from keystore import keys, pgschema
from keystore.models import Identity, Reason
from keystore.opening import open_keystore
from keystore.store import Conflict, KeystoreUnavailable
from tests.conftest import running_relay
from tests.support.keystores import KeystorePlace
from tests.support.postgres import Postgres, running_postgres
from tests.support.procs import keystore_cli
from tests.support.relayrun import write_config as relay_config
from tests.test_metrics import fetch, metrics_table

IP = "192.0.2.10"
PASSWORD = "pg-s3cret-word"  # the servers trust loopback: a password in the URL goes unused


def with_password(url: str) -> str:
    """`url` with PASSWORD in it, as a production URL may carry one."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


def redacted(url: str) -> str:
    return url.replace(f":{PASSWORD}@", ":***@")


def write_config(folder: Path, url: str) -> Path:
    config = folder / "relay.toml"
    config.write_text(f'[keystore]\nurl = "{url}"\npepper_file = "pepper"\n')
    return config


def keystore_url_edit(url: str):
    """For running_relay: the relay's [keystore] is the PostgreSQL database at `url`."""
    def edit(text: str) -> str:
        assert '[keystore]\npath = "keystore.db"\n' in text
        return text.replace('[keystore]\npath = "keystore.db"\n', f'[keystore]\nurl = "{url}"\n', 1)
    return edit


def stop(server: Postgres) -> None:
    """Stop a server of the test's own at once (as a crash or a failover would)."""
    command = [str(server.bin / "pg_ctl"), "-D", str(server.folder / "data"), "-m", "immediate",
               "-w", "stop"]
    if os.geteuid() == 0:
        command = ["runuser", "-u", server.user, "--", *command]
    subprocess.run(command, capture_output=True, timeout=60, check=True)


# ------------------------------------------------------------------ the CLI


async def test_the_keystore_cli_end_to_end_on_a_postgresql_keystore(tmp_path, pg_url):
    url = with_password(pg_url)
    config = write_config(tmp_path, url)

    created = keystore_cli(config, "init")
    assert (created.returncode, created.stderr) == (0, ""), created.stderr
    pepper = f"pepper {tmp_path / 'pepper'} (mode 0600)"
    assert created.stdout == f"keystore {redacted(url)} created; {pepper}\n"
    again = keystore_cli(config, "init")
    assert again.stdout == f"keystore {redacted(url)} is up to date; {pepper}\n"
    assert (tmp_path / "pepper").stat().st_mode & 0o777 == 0o600

    added = keystore_cli(config, "mailbox", "add", "alice@acme.test", "--workspace", "acme")
    assert added.returncode == 0, added.stderr
    made = keystore_cli(config, "key", "create", "--mailbox", "alice@acme.test", "--name", "CRM", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)

    relay = await open_keystore(url=url, pepper_file=tmp_path / "pepper")  # as a relay opens it
    try:
        identity = await relay.authenticate("alice@acme.test", key["secret"], IP)
        assert isinstance(identity, Identity) and identity.key_id == key["id"]

        revoked = keystore_cli(config, "key", "revoke", key["id"])
        assert revoked.stdout.strip() == f"key {key['id']} ('CRM') is now revoked", revoked.stderr
        assert await relay.authenticate("alice@acme.test", key["secret"], IP) is Reason.REVOKED
        assert await relay.recheck(identity) is Reason.REVOKED
    finally:
        await relay.close()

    listed = keystore_cli(config, "key", "list", "--json")
    assert [(k["id"], k["status"]) for k in json.loads(listed.stdout)] == [(key["id"], "revoked")]
    audit = keystore_cli(config, "audit", "--json")
    assert [e["action"] for e in json.loads(audit.stdout)] == ["mailbox.add", "key.create", "key.revoke"]

    backup = keystore_cli(config, "backup", str(tmp_path / "copy.db"))
    assert backup.returncode == 1
    assert "a PostgreSQL keystore is backed up with pg_dump" in backup.stderr
    assert not (tmp_path / "copy.db").exists()

    everything = created.stdout + again.stdout + backup.stderr + listed.stdout + audit.stdout
    assert PASSWORD not in everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pepper", "relay.toml"]  # no sqlite file


def test_commands_before_init_and_a_lost_pepper_are_refused(tmp_path, pg_url):
    url = with_password(pg_url)
    config = write_config(tmp_path, url)
    keys.create_pepper(tmp_path / "pepper")
    early = keystore_cli(config, "mailbox", "list")
    assert early.returncode == 1
    assert early.stderr == (f"keystore: {redacted(url)}: no keystore tables in this database "
                            "(run `keystore init`)\n")

    (tmp_path / "pepper").unlink()
    assert keystore_cli(config, "init").returncode == 0
    (tmp_path / "pepper").unlink()  # the tables are there: a new pepper would void every key
    lost = keystore_cli(config, "init")
    assert lost.returncode == 1
    assert lost.stderr == (f"keystore: {tmp_path / 'pepper'}: pepper file missing for the existing "
                           f"keystore {redacted(url)}; restore it (a new pepper would make every key "
                           "invalid)\n")
    assert not (tmp_path / "pepper").exists()
    assert PASSWORD not in early.stderr + lost.stderr


def test_check_config_reads_a_postgresql_keystore_without_changing_it(tmp_path, pg_url, postgres_server):
    url = with_password(pg_url)
    config = relay_config(tmp_path, 2525)
    config.write_text(keystore_url_edit(url)(config.read_text()))

    def check() -> list[str]:
        done = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                              capture_output=True, text=True, timeout=60)
        assert PASSWORD not in done.stdout + done.stderr
        return [line for line in done.stderr.splitlines() if "[keystore]" in line]

    assert keystore_cli(config, "init").returncode == 0
    assert check() == []
    database = pg_url.rsplit("/", 1)[1]
    postgres_server.psql("DROP TABLE audit, alias, auth_key, mailbox, workspace, admin_token CASCADE; "
                         "DELETE FROM keyrelay_schema WHERE component = 'keystore'", database)
    assert check() == [f"problem: {config}: [keystore] url: {redacted(url)}: no keystore tables in "
                       "this database (run `keystore init`)"]
    assert postgres_server.psql("SELECT count(*) FROM keyrelay_schema WHERE component = 'keystore'",
                                database) == "0"  # read, not migrated
    postgres_server.psql("INSERT INTO keyrelay_schema VALUES ('keystore', 99)", database)
    assert check() == [f"problem: {config}: [keystore] url: {redacted(url)}: keystore schema version 99 "
                       f"is newer than this program ({len(pgschema.MIGRATIONS)})"]


# ----------------------------------------------------------- notifications


async def test_changes_notify_every_relay_and_use_bookkeeping_does_not(tmp_path, pg_url):
    """What keystore/pgnotify.py's listener on every node hears: one notification per
    revoke, disable, rotation, edit, suspension, removal, none for the last-use writes that
    every node makes every second."""
    store = await KeystorePlace(tmp_path, pg_url).open()
    listener = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        await store.add_mailbox("alice@acme.test", workspace="acme", aliases=["sales@acme.test"],
                                actor="admin")
        await store.add_mailbox("bob@acme.test", workspace="acme", actor="admin")
        key, secret = await store.create_key(mailbox="alice@acme.test", name="CRM", actor="admin")
        other, _ = await store.create_key(workspace="acme", name="bulk", actor="admin")
        token, presented = await store.create_token(name="ops", role="owner", actor="admin")
        await listener.execute(f"LISTEN {pgschema.CHANNEL}")

        # bookkeeping: a login, a refused login with the right secret, an admin token's use
        assert isinstance(await store.authenticate("alice@acme.test", secret, IP), Identity)
        await store.flush_uses()
        await store.disable_key(key.id, actor="admin")  # the first change
        assert await store.authenticate("alice@acme.test", secret, IP) is Reason.DISABLED
        await store.flush_uses()
        assert (await store.verify_token(presented, IP)).last_used is not None
        used = await store.get_key(key.id)
        assert used.last_used is not None and used.last_failed_reason == "disabled"

        await store.enable_key(key.id, actor="admin")
        await store.rotate_key(key.id, grace=60, actor="admin")
        await store.end_rotation_grace(key.id, actor="admin")
        await store.update_key(key.id, {"note": "nightly"}, actor="admin")
        await store.revoke_key(key.id, actor="admin")
        await store.suspend_mailbox("alice@acme.test", reason="abuse", actor="admin")
        await store.suspend_workspace("acme", reason="unpaid", actor="admin")
        await store.revoke_token(token.id, actor="admin")
        await store.delete_key(other.id, actor="admin")
        await store.remove_mailbox("alice@acme.test", force=True, actor="admin")
        await store.remove_mailbox("bob@acme.test", force=False, actor="admin")

        expected = [f"key:{key.id}"] * 6 + [
            "mailbox:alice@acme.test", "workspace:acme", f"token:{token.id}", f"key:{other.id}",
            "key:" + key.id, "mailbox:alice@acme.test", "mailbox:bob@acme.test"]
        heard = [n async for n in listener.notifies(timeout=10, stop_after=len(expected))]
        assert [n.channel for n in heard] == [pgschema.CHANNEL] * len(expected)
        # removing alice deletes her key and her alias with her: one notification each for
        # the key and the mailbox (the alias is the mailbox's, said once)
        assert [n.payload for n in heard] == expected
        assert [n async for n in listener.notifies(timeout=0.5)] == []  # and nothing else
    finally:
        await listener.close()
        await store.close()


# --------------------------------------------------- two nodes, one database


async def test_two_keystores_on_one_database_are_one_keystore(tmp_path, pg_url):
    place = KeystorePlace(tmp_path, pg_url)
    a = await place.open()
    b = await place.open(create=False)
    try:
        await a.add_mailbox("alice@acme.test", workspace="acme", actor="node-a")
        made_at_a, secret_a = await a.create_key(mailbox="alice@acme.test", name="CRM", actor="node-a")
        made_at_b, secret_b = await b.create_key(mailbox="alice@acme.test", name="ERP", actor="node-b")
        at_b = await b.authenticate("alice@acme.test", secret_a, IP)
        at_a = await a.authenticate("alice@acme.test", secret_b, IP)
        assert isinstance(at_b, Identity) and at_b.key_id == made_at_a.id
        assert isinstance(at_a, Identity) and at_a.key_id == made_at_b.id

        await b.revoke_key(made_at_a.id, actor="node-b")
        assert await a.recheck(at_b) is Reason.REVOKED
        assert await a.authenticate("alice@acme.test", secret_a, IP) is Reason.REVOKED
        assert [e.actor for e in await a.audit_events()] == ["node-a", "node-a", "node-b", "node-b"]
    finally:
        await b.close()
        await a.close()


async def test_a_workspace_key_limit_holds_across_nodes_creating_at_once(tmp_path, pg_url):
    """Each create counts the active keys, then writes: two nodes at once must not both
    see room for the last key (the write lock spans every node, as BEGIN IMMEDIATE spans
    every process on one sqlite file)."""
    place = KeystorePlace(tmp_path, pg_url)
    nodes = [await place.open(), await place.open(create=False)]
    try:
        await nodes[0].add_mailbox("alice@acme.test", workspace="acme", actor="admin")
        await nodes[0].set_key_limit("acme", 3, actor="admin")
        attempts = [node.create_key(mailbox="alice@acme.test", name=f"key {i}", actor="admin")
                    for i in range(6) for node in nodes]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(outcomes) - len(refused) == 3
        assert all(isinstance(o, Conflict) and "limit 3" in str(o) for o in refused), refused
        assert len(await nodes[1].list_keys(status="active")) == 3
    finally:
        for node in nodes:
            await node.close()


# ----------------------------------------------------------- server gone


async def test_a_stopped_server_is_a_temporary_failure_for_clients_and_probes(tmp_path, sink):
    """The relay's PostgreSQL goes away: AUTH answers 454 4.7.0 (the client retries later),
    /readyz names the keystore, a new `keystore` command exits 1; none shows the password."""
    with running_postgres() as server:
        url = with_password(server.create_database("keystore"))
        async with running_relay(tmp_path, sink, edit=keystore_url_edit(url),
                                 upstream_extra=metrics_table()) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com")
            client = await h.login("alice@example.com", secret)
            await client.sendmail("alice@example.com", ["bob@example.net"],
                                  b"From: alice@example.com\r\nSubject: before\r\n\r\nhi\r\n")
            await client.quit()
            await sink.wait_for(1)
            assert await fetch(h, "/readyz") == (200, "application/json", '{"ready": true}\n')

            stop(server)
            client = await h.client()
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                await client.auth_plain("alice@example.com", secret)
            assert (refused.value.code, refused.value.message[:5]) == (454, "4.7.0")
            client.close()

            status, _, body = await fetch(h, "/readyz")
            assert status == 503
            problem = json.loads(body)["failing"]["keystore"]
            assert problem.startswith(f"{redacted(url)}: ") and PASSWORD not in body

        with pytest.raises(KeystoreUnavailable) as unavailable:
            await open_keystore(url=url, pepper_file=tmp_path / "pepper")
        assert PASSWORD not in str(unavailable.value)
        late = keystore_cli(tmp_path / "relay.toml", "mailbox", "list")
        assert late.returncode == 1
        assert late.stderr.startswith(f"keystore: {redacted(url)}: ") and late.stderr.count("\n") == 1
        assert PASSWORD not in late.stderr
