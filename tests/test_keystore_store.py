"""KeyStore against a real sqlite file and a real PostgreSQL database (every test that is
not about sqlite's files runs on both: `keystore_place`): every login outcome, key
lifecycle, audit, files.

No mocks and no clock patching: expiry and rotation grace are real (short) waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import time
from pathlib import Path

import psycopg
import pytest

from keystore import keys
from keystore.keys import PepperError
from keystore.models import Identity, Reason
from keystore.store import Conflict, KeyStore, KeystoreUnavailable, StoreError

IP = "192.0.2.10"


async def open_store(folder: Path, *, create: bool = True, **kwargs) -> KeyStore:
    """A sqlite keystore in `folder` (the tests about sqlite's own files)."""
    return await KeyStore.open(folder / "keystore.db", folder / "pepper", create=create, **kwargs)


@pytest.fixture
async def store(keystore_place):
    store = await keystore_place.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def world(store):
    """Two workspaces: acme (alice with aliases and a route, bob) and globex (carol)."""
    await store.add_mailbox("alice@acme.test", workspace="acme",
                            aliases=["sales@acme.test", "info@acme.test"], route="mailbox-route",
                            actor="admin")
    await store.add_mailbox("bob@acme.test", workspace="acme", actor="admin")
    await store.add_mailbox("carol@globex.test", workspace="globex", actor="admin")
    return store


async def new_key(store: KeyStore, mailbox: str | None = None, **kwargs):
    return await store.create_key(mailbox=mailbox, name=kwargs.pop("name", "test key"),
                                  actor=kwargs.pop("actor", "admin"), **kwargs)


def mutate(secret: str, index: int) -> str:
    """The same key string with one character changed (still well-formed)."""
    old = secret[index]
    new = "7" if old != "7" else "8"
    return secret[:index] + new + secret[index + 1:]


# ------------------------------------------------------------------ success


async def test_login_returns_identity_and_records_use(world):
    record, secret = await new_key(world, "alice@acme.test",
                                   permissions=("email.send", "mailbox.read"))
    assert record.last_used is None and record.last_ip is None

    before = time.time()
    identity = await world.authenticate("alice@acme.test", secret, IP)

    assert isinstance(identity, Identity)
    assert identity.mailbox == "alice@acme.test"
    assert identity.key_id == record.id
    assert identity.workspace == "acme"
    assert identity.permissions == frozenset({"email.send", "mailbox.read"})
    assert sorted(identity.aliases) == ["info@acme.test", "sales@acme.test"]
    assert identity.route == "mailbox-route"  # the key names none: the mailbox's route
    used = await world.get_key(record.id)
    assert used.last_ip == IP
    assert before <= used.last_used <= time.time()


async def test_key_route_overrides_mailbox_route(world):
    _, secret = await new_key(world, "alice@acme.test", route="key-route", rate_limit=30)
    identity = await world.authenticate("alice@acme.test", secret, IP)
    assert isinstance(identity, Identity)
    assert identity.route == "key-route"
    assert identity.rate_limit == 30

    _, plain = await new_key(world, "bob@acme.test")
    identity = await world.authenticate("bob@acme.test", plain, IP)
    assert identity.route is None and identity.aliases == () and identity.rate_limit is None


async def test_workspace_key_logs_in_as_any_active_mailbox_of_its_workspace(world):
    record, secret = await new_key(world, workspace="acme")
    assert record.mailbox is None and record.scope == "workspace:acme"

    for address in ("alice@acme.test", "bob@acme.test"):
        identity = await world.authenticate(address, secret, IP)
        assert isinstance(identity, Identity), address
        assert identity.mailbox == address
        assert identity.key_id == record.id
        assert identity.workspace == "acme"
    identity = await world.authenticate("alice@acme.test", secret, IP)
    assert sorted(identity.aliases) == ["info@acme.test", "sales@acme.test"]

    # a mailbox added later is covered too
    await world.add_mailbox("dave@acme.test", workspace="acme", actor="admin")
    assert isinstance(await world.authenticate("dave@acme.test", secret, IP), Identity)

    # but not a suspended one
    await world.suspend_mailbox("bob@acme.test", reason="abuse", actor="admin")
    assert await world.authenticate("bob@acme.test", secret, IP) is Reason.SUSPENDED


# ---------------------------------------------------------- bad credentials


BAD_CASES = [
    "unknown mailbox",
    "unparseable username",
    "unknown key id",
    "wrong secret",
    "empty string",
    "not a key",
    "truncated",
    "extra character",
    "wrong prefix",
    "bad checksum (secret changed)",
    "bad checksum (checksum changed)",
    "bad checksum (id changed)",
    "key of another mailbox",
    "key of a mailbox in another workspace",
    "workspace key for another workspace's mailbox",
]


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_credentials(world, case):
    alice_key, alice = await new_key(world, "alice@acme.test")
    _, bob = await new_key(world, "bob@acme.test")
    _, carol = await new_key(world, "carol@globex.test")
    _, globex_ws = await new_key(world, workspace="globex")
    id_start = len(keys.KEY_PREFIX)
    username, presented = {
        "unknown mailbox": ("nobody@acme.test", alice),
        "unparseable username": ("not an address", alice),
        "unknown key id": ("alice@acme.test", keys.generate_key()[0]),
        "wrong secret": ("alice@acme.test", keys.format_key(alice_key.id, keys.generate_secret())),
        "empty string": ("alice@acme.test", ""),
        "not a key": ("alice@acme.test", "hunter2"),
        "truncated": ("alice@acme.test", alice[:-1]),
        "extra character": ("alice@acme.test", alice + "x"),
        "wrong prefix": ("alice@acme.test", "xak_" + alice[id_start:]),
        "bad checksum (secret changed)": ("alice@acme.test", mutate(alice, id_start + 12 + 1 + 20)),
        "bad checksum (checksum changed)": ("alice@acme.test", mutate(alice, len(alice) - 1)),
        "bad checksum (id changed)": ("alice@acme.test", mutate(alice, id_start + 3)),
        "key of another mailbox": ("alice@acme.test", bob),
        "key of a mailbox in another workspace": ("alice@acme.test", carol),
        "workspace key for another workspace's mailbox": ("alice@acme.test", globex_ws),
    }[case]
    assert presented != alice or username != "alice@acme.test"

    assert await world.authenticate(username, presented, IP) is Reason.BAD_CREDENTIALS
    # nothing is recorded for a refused login
    assert all(k.last_used is None for k in await world.list_keys())
    # and the right key still works
    assert isinstance(await world.authenticate("alice@acme.test", alice, IP), Identity)


async def test_reasons_are_only_given_with_the_right_secret(world):
    record, secret = await new_key(world, "alice@acme.test")
    wrong = keys.format_key(record.id, keys.generate_secret())
    await world.revoke_key(record.id, actor="admin")
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.REVOKED
    assert await world.authenticate("alice@acme.test", wrong, IP) is Reason.BAD_CREDENTIALS

    _, bob = await new_key(world, "bob@acme.test")
    await world.suspend_mailbox("bob@acme.test", reason=None, actor="admin")
    assert await world.authenticate("bob@acme.test", bob, IP) is Reason.SUSPENDED
    # another mailbox's key on a suspended mailbox says nothing about the suspension
    _, carol = await new_key(world, "carol@globex.test")
    assert await world.authenticate("bob@acme.test", carol, IP) is Reason.BAD_CREDENTIALS


# ------------------------------------------------------- refusals with reasons


async def test_revoked(world):
    record, secret = await new_key(world, "alice@acme.test")
    revoked = await world.revoke_key(record.id, actor="admin")
    assert revoked.status == "revoked"
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.REVOKED
    assert (await world.get_key(record.id)).last_used is None


async def test_disabled_and_enabled_again(world):
    record, secret = await new_key(world, "alice@acme.test")
    assert (await world.disable_key(record.id, actor="admin")).status == "disabled"
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.DISABLED
    assert (await world.enable_key(record.id, actor="admin")).status == "active"
    assert isinstance(await world.authenticate("alice@acme.test", secret, IP), Identity)


async def test_expired(world):
    record, secret = await new_key(world, "alice@acme.test", expires=time.time() + 1.5)
    assert isinstance(await world.authenticate("alice@acme.test", secret, IP), Identity)
    await asyncio.sleep(max(0.0, record.expires - time.time()) + 0.1)
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.EXPIRED


async def test_expiry_in_the_past_is_refused(world):
    with pytest.raises(StoreError, match="past"):
        await new_key(world, "alice@acme.test", expires=time.time() - 1)


async def test_suspended_until_resumed(world):
    _, secret = await new_key(world, "alice@acme.test")
    mailbox = await world.suspend_mailbox("alice@acme.test", reason="spam complaint", actor="admin")
    assert mailbox.status == "suspended" and mailbox.suspended_reason == "spam complaint"
    assert mailbox.suspended_at is not None
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.SUSPENDED
    with pytest.raises(StoreError, match="already suspended"):
        await world.suspend_mailbox("alice@acme.test", reason=None, actor="admin")

    mailbox = await world.resume_mailbox("alice@acme.test", actor="admin")
    assert mailbox.status == "active" and mailbox.suspended_reason is None
    assert isinstance(await world.authenticate("alice@acme.test", secret, IP), Identity)


async def test_key_without_send_permission(world):
    record, secret = await new_key(world, "alice@acme.test", permissions=("mailbox.read",))
    assert record.permissions == ("mailbox.read",)
    assert await world.authenticate("alice@acme.test", secret, IP) is Reason.NO_SEND_PERMISSION


async def test_unknown_permission_is_refused(world):
    with pytest.raises(StoreError, match="unknown permission"):
        await new_key(world, "alice@acme.test", permissions=("email.send", "root"))
    with pytest.raises(StoreError, match="at least one permission"):
        await new_key(world, "alice@acme.test", permissions=())


# ------------------------------------------------------------------ rotation


async def test_rotation_without_grace_stops_the_old_secret_at_once(world):
    record, old = await new_key(world, "alice@acme.test")
    rotated, new = await world.rotate_key(record.id, actor="admin")
    assert new != old and new.startswith(f"rak_{record.id}_")
    assert rotated.rotated is not None and rotated.previous_valid_until is None
    assert await world.authenticate("alice@acme.test", old, IP) is Reason.BAD_CREDENTIALS
    identity = await world.authenticate("alice@acme.test", new, IP)
    assert isinstance(identity, Identity) and identity.key_id == record.id


async def test_rotation_grace_keeps_the_old_secret_until_it_passes(world):
    record, old = await new_key(world, "alice@acme.test")
    rotated, new = await world.rotate_key(record.id, grace=1.5, actor="admin")
    assert rotated.previous_valid_until == pytest.approx(time.time() + 1.5, abs=0.5)
    assert isinstance(await world.authenticate("alice@acme.test", old, IP), Identity)
    assert isinstance(await world.authenticate("alice@acme.test", new, IP), Identity)

    await asyncio.sleep(max(0.0, rotated.previous_valid_until - time.time()) + 0.1)
    assert await world.authenticate("alice@acme.test", old, IP) is Reason.BAD_CREDENTIALS
    assert isinstance(await world.authenticate("alice@acme.test", new, IP), Identity)


async def test_rotating_again_during_grace_drops_the_oldest_secret(world):
    record, first = await new_key(world, "alice@acme.test")
    _, second = await world.rotate_key(record.id, grace=60, actor="admin")
    _, third = await world.rotate_key(record.id, grace=60, actor="admin")
    assert await world.authenticate("alice@acme.test", first, IP) is Reason.BAD_CREDENTIALS
    assert isinstance(await world.authenticate("alice@acme.test", second, IP), Identity)
    assert isinstance(await world.authenticate("alice@acme.test", third, IP), Identity)


async def test_revoking_during_grace_kills_the_old_secret_too(world):
    record, old = await new_key(world, "alice@acme.test")
    _, new = await world.rotate_key(record.id, grace=60, actor="admin")
    assert isinstance(await world.authenticate("alice@acme.test", old, IP), Identity)
    await world.revoke_key(record.id, actor="admin")
    assert await world.authenticate("alice@acme.test", old, IP) is Reason.BAD_CREDENTIALS
    assert await world.authenticate("alice@acme.test", new, IP) is Reason.REVOKED


async def test_revoked_is_permanent(world):
    record, _ = await new_key(world, "alice@acme.test")
    await world.revoke_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="revoked"):
        await world.enable_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="revoked"):
        await world.disable_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="revoked"):
        await world.revoke_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="revoked"):
        await world.rotate_key(record.id, actor="admin")
    assert (await world.get_key(record.id)).status == "revoked"


async def test_status_changes_to_the_same_status_are_refused(world):
    record, _ = await new_key(world, "alice@acme.test")
    with pytest.raises(StoreError, match="already active"):
        await world.enable_key(record.id, actor="admin")
    await world.disable_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="already disabled"):
        await world.disable_key(record.id, actor="admin")
    with pytest.raises(StoreError, match="unknown key"):
        await world.disable_key("aaaaaaaaaaaa", actor="admin")


# ---------------------------------------------------- mailboxes and addresses


async def test_addresses_are_case_insensitive(store):
    mailbox = await store.add_mailbox("Alice@Example.COM", workspace="w",
                                      aliases=["Sales@EXAMPLE.com"], actor="admin")
    assert mailbox.address == "alice@example.com"
    assert mailbox.aliases == ("sales@example.com",)
    assert (await store.get_mailbox("ALICE@example.com")).address == "alice@example.com"

    with pytest.raises(StoreError, match="already in use"):
        await store.add_mailbox("alice@EXAMPLE.com", workspace="w", actor="admin")
    with pytest.raises(StoreError, match="already in use"):
        await store.add_mailbox("SALES@example.com", workspace="w", actor="admin")

    record, secret = await new_key(store, "aLiCe@example.com")
    assert record.mailbox == "alice@example.com"
    for username in ("alice@example.com", "ALICE@EXAMPLE.COM", "Alice@Example.Com"):
        identity = await store.authenticate(username, secret, IP)
        assert isinstance(identity, Identity), username
        assert identity.mailbox == "alice@example.com"
    assert [k.id for k in await store.list_keys(mailbox="ALICE@example.com")] == [record.id]


async def test_an_alias_cannot_be_another_mailbox(world):
    with pytest.raises(StoreError, match="already in use: sales@acme.test"):
        await world.add_mailbox("sales@acme.test", workspace="acme", actor="admin")
    with pytest.raises(StoreError, match="already in use: bob@acme.test"):
        await world.add_mailbox("eve@acme.test", workspace="acme", aliases=["bob@acme.test"],
                                actor="admin")
    with pytest.raises(StoreError, match="invalid mailbox address"):
        await world.add_mailbox("no-at-sign", workspace="acme", actor="admin")


async def test_remove_mailbox_needs_force_when_it_has_keys(world):
    record, _ = await new_key(world, "alice@acme.test")
    _, ws_secret = await new_key(world, workspace="acme")
    with pytest.raises(StoreError, match="1 key"):
        await world.remove_mailbox("alice@acme.test", force=False, actor="admin")
    assert (await world.get_mailbox("alice@acme.test")).keys == 1

    assert await world.remove_mailbox("alice@acme.test", force=True, actor="admin") == 1
    with pytest.raises(StoreError, match="unknown mailbox"):
        await world.get_mailbox("alice@acme.test")
    with pytest.raises(StoreError, match="unknown key"):
        await world.get_key(record.id)
    # its aliases are free again, and the workspace key lives on
    await world.add_mailbox("sales@acme.test", workspace="acme", actor="admin")
    assert isinstance(await world.authenticate("sales@acme.test", ws_secret, IP), Identity)
    assert await world.remove_mailbox("bob@acme.test", force=False, actor="admin") == 0


# ---------------------------------------------------------------- key limits


async def test_active_key_limit_per_workspace(world):
    await world.set_key_limit("acme", 2, actor="admin")
    first, _ = await new_key(world, "alice@acme.test")
    await new_key(world, workspace="acme")
    with pytest.raises(StoreError, match="limit 2"):
        await new_key(world, "bob@acme.test")
    # other workspaces are not affected
    await new_key(world, "carol@globex.test")

    # a disabled key does not count, but enabling it again is held to the limit
    await world.disable_key(first.id, actor="admin")
    third, _ = await new_key(world, "bob@acme.test")
    with pytest.raises(StoreError, match="limit 2"):
        await world.enable_key(first.id, actor="admin")
    await world.revoke_key(third.id, actor="admin")
    await world.enable_key(first.id, actor="admin")

    spaces = {w.name: w for w in await world.list_workspaces()}
    assert (spaces["acme"].key_limit, spaces["acme"].active_keys, spaces["acme"].mailboxes) == (2, 2, 2)
    with pytest.raises(StoreError, match="unknown workspace"):
        await world.set_key_limit("nope", 5, actor="admin")


async def test_default_key_limit_applies_to_new_workspaces(keystore_place):
    store = await keystore_place.open(default_key_limit=1)
    try:
        await store.add_mailbox("a@w.test", workspace="w", actor="admin")
        await new_key(store, "a@w.test")
        with pytest.raises(StoreError, match="limit 1"):
            await new_key(store, "a@w.test")
    finally:
        await store.close()


# --------------------------------------------------------------------- audit


async def test_every_change_is_audited(store):
    await store.add_mailbox("alice@acme.test", workspace="acme", actor="ann")
    record, secret = await new_key(store, "alice@acme.test", actor="ann")
    await store.disable_key(record.id, actor="ann")
    await store.enable_key(record.id, actor="ann")
    await store.rotate_key(record.id, grace=30, actor="ann")
    await store.suspend_mailbox("alice@acme.test", reason="holiday", actor="ann")
    await store.resume_mailbox("alice@acme.test", actor="ann")
    await store.set_key_limit("acme", 7, actor="ann")
    await store.revoke_key(record.id, actor="ann")
    await store.delete_key(record.id, actor="ann")
    await store.remove_mailbox("alice@acme.test", force=False, actor="ann")

    events = await store.audit_events()
    assert [e.action for e in events] == [
        "mailbox.add", "key.create", "key.disable", "key.enable", "key.rotate",
        "mailbox.suspend", "mailbox.resume", "workspace.limit", "key.revoke", "key.delete",
        "mailbox.remove",
    ]
    assert {e.actor for e in events} == {"ann"}
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.at <= time.time() for e in events)
    by_action = {e.action: e for e in events}
    assert by_action["mailbox.suspend"].detail == "holiday"
    assert by_action["key.rotate"].detail == "grace=30s"
    assert "acme key_limit=7" in by_action["workspace.limit"].detail
    assert "test key" in by_action["key.create"].detail

    key_events = await store.audit_events(key_id=record.id)
    assert [e.action for e in key_events] == [
        "key.create", "key.disable", "key.enable", "key.rotate", "key.revoke", "key.delete",
    ]
    assert len(await store.audit_events(mailbox="ALICE@acme.test")) == 10
    assert await store.audit_events(since=time.time() + 60) == []


async def test_logins_and_refused_changes_add_no_audit_rows(world):
    record, secret = await new_key(world, "alice@acme.test")
    count = len(await world.audit_events())
    await world.authenticate("alice@acme.test", secret, IP)
    await world.authenticate("alice@acme.test", "wrong", IP)
    with pytest.raises(StoreError):
        await world.add_mailbox("alice@acme.test", workspace="acme", actor="admin")
    with pytest.raises(StoreError):
        await world.enable_key(record.id, actor="admin")
    assert len(await world.audit_events()) == count


async def test_audit_log_is_append_only(keystore_place, world):
    await new_key(world, "alice@acme.test")
    before = await world.audit_events()
    assert before
    attempts = ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit",
                f"DELETE FROM audit WHERE id = {before[0].id}"]
    if keystore_place.url is None:
        with contextlib.closing(sqlite3.connect(keystore_place.folder / "keystore.db",
                                                isolation_level=None)) as raw:
            for attempt in attempts:
                with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                    raw.execute(attempt)
    else:
        with psycopg.connect(keystore_place.url, autocommit=True) as raw:
            for attempt in [*attempts, "TRUNCATE audit"]:
                with pytest.raises(psycopg.Error, match="append-only"):
                    raw.execute(attempt)
    assert await world.audit_events() == before


# -------------------------------------------------------------------- files


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_database_and_pepper_files_are_private(tmp_path):
    old_umask = os.umask(0o022)
    try:
        store = await open_store(tmp_path / "nested")
    finally:
        os.umask(old_umask)
    try:
        await store.add_mailbox("a@w.test", workspace="w", actor="admin")
        assert mode(tmp_path / "nested" / "keystore.db") == 0o600
        assert mode(tmp_path / "nested" / "pepper") == 0o600
        for extra in ("keystore.db-wal", "keystore.db-shm"):
            if (tmp_path / "nested" / extra).exists():
                assert mode(tmp_path / "nested" / extra) == 0o600, extra
    finally:
        await store.close()


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=lambda mode: f"{mode:04o}")
async def test_pepper_readable_by_other_users_is_refused(tmp_path, mode):
    store = await open_store(tmp_path)
    await store.close()
    (tmp_path / "pepper").chmod(mode)
    refusal = f"pepper file has mode {mode:04o}, .*run `chmod 600 "
    with pytest.raises(PepperError, match=refusal):
        await open_store(tmp_path, create=False)
    with pytest.raises(PepperError, match=refusal):
        await open_store(tmp_path, create=True)


async def test_missing_files_are_refused_without_create(tmp_path):
    with pytest.raises(PepperError, match="not found"):
        await open_store(tmp_path, create=False)
    keys.create_pepper(tmp_path / "pepper")
    with pytest.raises(KeystoreUnavailable, match="keystore init"):
        await open_store(tmp_path, create=False)
    assert not (tmp_path / "keystore.db").exists()


async def test_create_never_replaces_a_lost_pepper(tmp_path):
    store = await open_store(tmp_path)
    await store.close()
    (tmp_path / "pepper").unlink()
    with pytest.raises(PepperError, match="pepper file missing"):
        await open_store(tmp_path, create=True)
    assert not (tmp_path / "pepper").exists()


async def test_reopening_keeps_the_pepper_and_the_keys(tmp_path):
    store = await open_store(tmp_path)
    try:
        await store.add_mailbox("a@w.test", workspace="w", actor="admin")
        _, secret = await new_key(store, "a@w.test")
    finally:
        await store.close()
    pepper = (tmp_path / "pepper").read_bytes()
    store = await open_store(tmp_path, create=True)
    try:
        assert (tmp_path / "pepper").read_bytes() == pepper
        assert isinstance(await store.authenticate("a@w.test", secret, IP), Identity)
    finally:
        await store.close()


async def test_backup_is_a_working_copy(keystore_place, world):
    tmp_path = keystore_place.folder
    record, secret = await new_key(world, "alice@acme.test")
    target = tmp_path / "backups" / "copy.db"
    if keystore_place.url is not None:  # pg_dump's job: said so, nothing written
        with pytest.raises(StoreError, match="backed up with pg_dump"):
            await world.backup(target)
        assert not target.exists() and not target.parent.exists()
        return
    await world.backup(target)
    assert mode(target) == 0o600
    with pytest.raises(StoreError, match="already exists"):
        await world.backup(target)
    copy = await KeyStore.open(target, tmp_path / "pepper")
    try:
        assert (await copy.get_key(record.id)).name == "test key"
        assert isinstance(await copy.authenticate("alice@acme.test", secret, IP), Identity)
    finally:
        await copy.close()


# ------------------------------------------------------------ the engines


async def test_either_engine_speaks_the_keystores_errors_not_its_drivers(keystore_place, store):
    """The adapters turn a broken uniqueness rule into Conflict and any other failure into
    KeystoreUnavailable (454 at AUTH, exit 1 in the CLI), on sqlite and on PostgreSQL alike:
    nothing above them knows which driver is behind."""
    database = store._db
    insert = "INSERT INTO workspace (name, key_limit, created) VALUES (?, ?, ?)"
    first = await database.insert_returning_id(insert, ("acme", 5, 0.0))
    assert await database.fetch("SELECT id, name FROM workspace") == [(first, "acme")]
    with pytest.raises(Conflict):
        async with database.transaction() as tx:
            await tx.execute("INSERT INTO workspace (name, key_limit, created) VALUES ('beta', 1, 0)")
            await tx.insert_returning_id(insert, ("acme", 5, 0.0))
    assert [n for (n,) in await database.fetch("SELECT name FROM workspace")] == ["acme"]  # rolled back
    with pytest.raises(KeystoreUnavailable):
        await database.read("SELECT nothing FROM nowhere")
    await store.close()
    with pytest.raises(KeystoreUnavailable):
        await store.authenticate("a@w.test", keys.generate_key(keys.generate_key_id())[0], IP)


# ------------------------------------------------------- several connections


async def test_recheck_sees_changes_made_by_another_connection(keystore_place, world):
    _, alice = await new_key(world, "alice@acme.test")
    bob_key, bob = await new_key(world, "bob@acme.test")
    carol_key, carol = await new_key(world, "carol@globex.test")
    alice_id = await world.authenticate("alice@acme.test", alice, IP)
    bob_id = await world.authenticate("bob@acme.test", bob, IP)
    carol_id = await world.authenticate("carol@globex.test", carol, IP)
    assert isinstance(alice_id, Identity) and isinstance(bob_id, Identity)
    assert await world.recheck(alice_id) == alice_id

    admin = await keystore_place.open(create=False)
    try:
        await admin.revoke_key(bob_key.id, actor="admin")
        await admin.suspend_mailbox("alice@acme.test", reason="abuse", actor="admin")
        await admin.disable_key(carol_key.id, actor="admin")
        assert await world.recheck(bob_id) is Reason.REVOKED
        assert await world.recheck(alice_id) is Reason.SUSPENDED
        assert await world.recheck(carol_id) is Reason.DISABLED

        await admin.resume_mailbox("alice@acme.test", actor="admin")
        assert await world.recheck(alice_id) == alice_id
        await admin.delete_key(carol_key.id, actor="admin")
        assert await world.recheck(carol_id) is Reason.REVOKED
    finally:
        await admin.close()


async def test_cli_writers_and_logins_run_concurrently(keystore_place, world):
    config = keystore_place.folder / "relay.toml"
    config.write_text(keystore_place.config_lines())
    logins = [(f"user{i}@acme.test", (await new_key(world, workspace="acme"))[1]) for i in range(2)]
    for address, _ in logins:
        await world.add_mailbox(address, workspace="acme", actor="admin")
    logins.append(("alice@acme.test", (await new_key(world, "alice@acme.test"))[1]))
    env = {**os.environ, "KEYSTORE_ACTOR": "concurrency-test"}
    env.pop("RELAY_CONFIG", None)

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keystore", "--config", str(config), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        out, err = await proc.communicate()
        return proc.returncode, f"{args}: {out.decode()} {err.decode()}"

    async def writer(n: int) -> list[tuple[int, str]]:
        address = f"writer{n}@globex.test"
        return [
            await cli("mailbox", "add", address, "--workspace", "globex"),
            await cli("key", "create", "--mailbox", address, "--name", f"writer {n}"),
            await cli("key", "create", "--mailbox", "bob@acme.test", "--name", f"bob {n}"),
        ]

    writers = asyncio.gather(*(writer(n) for n in range(4)))
    outcomes: list[object] = []
    while not writers.done():
        for address, secret in logins:
            outcomes.append(await world.authenticate(address, secret, IP))
        await asyncio.sleep(0)
    results = [r for batch in await writers for r in batch]

    assert [code for code, _ in results] == [0] * 12, [text for code, text in results if code]
    assert len(outcomes) >= len(logins)
    refused = {o for o in outcomes if not isinstance(o, Identity)}
    assert not refused, refused
    assert len(await world.list_mailboxes("globex")) == 5
    bobs = await world.list_keys(mailbox="bob@acme.test")  # also acme's 2 workspace keys
    assert len([k for k in bobs if k.mailbox == "bob@acme.test"]) == 4
    assert {e.actor for e in await world.audit_events() if e.mailbox and "writer" in e.mailbox} == {
        "concurrency-test"
    }


def _prepare(path: str) -> str:
    from keystore.db import prepare_database

    try:
        prepare_database(Path(path), create=True)
    except Exception as exc:  # reported to the parent
        return repr(exc)
    return "ok"


def test_processes_creating_the_same_database_at_once_all_succeed(tmp_path):
    """Switching a new file to WAL takes a lock sqlite does not wait for; several
    `keystore init` (or relay and `relay queue`) starting together must still all work."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for round_ in range(15):
            path = str(tmp_path / f"k{round_}.db")
            assert pool.map(_prepare, [path] * 6) == ["ok"] * 6
