"""Edge cases of issue 11's key operations found in review: values a careless admin or a
limited admin token can send (through the CLI, or the service the HTTP API is thin over),
owners typed with stray spaces, text meant for someone else's terminal, the reports'
idea of a key that needs looking at, and `admin-token create --replace` run twice at once.
Real CLI subprocesses on real sqlite files and real PostgreSQL databases, as in
test_keystore_admin_ops.py."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time

import pytest

from keystore import keys
from keystore.opening import open_keystore
from keystore.schema import MIGRATIONS, run_migrations
from keystore.service import Actor, AdminService
from keystore.store import KeyStore, StoreError
from relay.config import load_config
from tests.test_keystore_admin_ops import age, cli_at, setup
from tests.test_keystore_cli import CLI


async def open_service(cli: CLI) -> tuple[KeyStore, AdminService]:
    """The keystore the CLI's config names (either engine), and the service over it."""
    ks = load_config(cli.config).keystore
    store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file)
    return store, AdminService(store)


EDITOR = Actor(name="token:provisioning (aaaaaaaaaaaa)", role="editor", workspaces=frozenset({"acme"}))


# ------------------------------------------------------------- owners and revocation


def test_an_owner_typed_with_spaces_or_other_case_is_still_found_and_revoked(keystore_place):
    """A contractor leaves: `key revoke --owner dana` must not miss the key someone created
    with `--owner " Dana "`, nor `--owner åsa` the key of "Åsa" (it would stay active,
    unnoticed)."""
    cli = cli_at(keystore_place)
    setup(cli)
    spaced = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM", "--owner", " Dana ")["id"]
    assert cli.json("key", "show", spaced)["owner"] == "Dana"
    assert [k["id"] for k in cli.json("key", "list", "--owner", "dana")] == [spaced]
    revoked = cli.json("key", "revoke", "--owner", "dana", "--yes")
    assert [k["id"] for k in revoked] == [spaced]
    accented = cli.create_key("--mailbox", "alice@acme.test", "--name", "ESP", "--owner", "Åsa Öberg")["id"]
    assert [k["id"] for k in cli.json("key", "list", "--owner", "åsa öberg")] == [accented]
    assert [k["id"] for k in cli.json("key", "revoke", "--owner", "ÅSA ÖBERG", "--yes")] == [accented]
    for blank_owner in (" ", ""):  # refused in the service's words, nothing listed or asked
        out = cli.run("key", "revoke", "--owner", blank_owner)
        assert (out.returncode, out.stdout, out.stderr) == (
            1, "", "keystore: an owner to revoke the keys of must not be empty\n")
    blank = cli.create_key("--mailbox", "alice@acme.test", "--name", "Blank", "--owner", "  ")
    assert cli.json("key", "show", blank["id"])["owner"] is None


# ------------------------------------------------------- values update_key is handed


REFUSED_SETTINGS = [
    ({"rate_limit": True}, "a rate limit is a number of messages per minute, at least 1"),
    ({"rate_limit": 10**20}, "a rate limit is at most 1000000 messages per minute"),
    ({"rate_limit": 2.5}, "a rate limit is a number of messages per minute, at least 1"),
    ({"expires": math.inf}, "expiry is not a time"),
    ({"expires": math.nan}, "expiry is not a time"),
    ({"expires": "2099-01-01"}, "expiry is not a time"),
    ({"expires": True}, "expiry is not a time"),
    ({"expires": 1e300}, "expiry is after 9999-12-31"),
    ({"expires": 253402300800.0}, "expiry is after 9999-12-31"),  # 10000-01-01: no date shows it
    ({"allow_from": "10.0.0.0/8"}, "allow-from is a list of networks (CIDR), not one text"),
    ({"allow_from": ""}, "allow-from is a list of networks (CIDR), not one text"),
    ({"owner": 5}, "owner must be text"),
    ({"note": "\x1b]0;owned\x07"}, "note must not contain control characters"),
    ({"owner": "dana\r\nstatus: revoked"}, "owner must not contain control characters"),
    ({"route": "main\x00"}, "route must not contain control characters"),
    ({"owner": "x" * 201}, "owner is at most 200 characters"),
    ({"note": "x" * 2001}, "note is at most 2000 characters"),
]


async def test_update_key_refuses_values_that_are_not_settings(keystore_place):
    """Nothing of these may reach the database: a float('inf') expiry or a 21-digit rate
    limit used to escape as OverflowError (a 500, a CLI traceback) and a year-10000 expiry
    was stored, after which no listing of the workspace could be shown. (One keystore for
    every case: each is refused, so none changes what the next one meets.)"""
    cli = cli_at(keystore_place)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM", "--rate-limit", "5")["id"]
    store, service = await open_service(cli)
    try:
        for changes, message in REFUSED_SETTINGS:
            with pytest.raises(StoreError) as refused:
                await service.update_key(EDITOR, key, changes)
            assert str(refused.value) == message, changes
            with pytest.raises(StoreError) as refused:
                await service.create_key(EDITOR, mailbox="alice@acme.test", name="Other", **changes)
            assert str(refused.value) == message, changes
            after = await service.key(EDITOR, key)
            assert (after.rate_limit, after.expires, after.allow_from, after.owner, after.note) == (
                5, None, (), None, None), changes
    finally:
        await store.close()
    assert [e["action"] for e in cli.json("audit", "--key", key)] == ["key.create"]
    assert [k["name"] for k in cli.json("key", "list")] == ["CRM"]
    assert len(cli.json("key", "list")) == 1


async def test_a_note_keeps_its_lines_and_values_of_the_right_kind_are_taken(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")["id"]
    store, service = await open_service(cli)
    try:
        updated = await service.update_key(EDITOR, key, {
            "note": " runs nightly\r\n\tfrom the billing box ", "expires": int(time.time()) + 3600,
            "rate_limit": 1_000_000, "allow_from": ["192.0.2.0/24"], "owner": " Dana "})
    finally:
        await store.close()
    assert updated.note == "runs nightly\n\tfrom the billing box"
    assert (updated.rate_limit, updated.allow_from, updated.owner) == (1_000_000, ("192.0.2.0/24",), "Dana")
    shown = cli.ok("key", "show", key)
    assert "note:                   runs nightly\\n\\tfrom the billing box\n" in shown


def test_the_cli_refuses_out_of_range_values_in_one_line(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")["id"]
    assert cli.refused("key", "update", key, "--rate-limit", "99999999999999999999") == (
        "keystore: a rate limit is at most 1000000 messages per minute")
    assert cli.refused("key", "update", key, "--ttl", "4000000d") == "keystore: expiry is after 9999-12-31"
    assert cli.refused("key", "create", "--mailbox", "alice@acme.test", "--name", "X",
                       "--ttl", "4000000d") == "keystore: expiry is after 9999-12-31"
    assert cli.json("key", "show", key)["expires"] is None
    cli.ok("key", "list")


def test_a_route_is_judged_as_it_will_be_stored(keystore_place):
    """The store strips a route and takes a blank one as none: the check against the
    config's routes judges that value, not the one typed (" bulk " is bulk; "" clears)."""
    cli = cli_at(keystore_place, routed=True)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM", "--route", "main")["id"]
    assert cli.json("key", "update", key, "--route", " bulk ")["route"] == "bulk"
    assert cli.json("key", "update", key, "--route", "")["route"] is None
    assert cli.refused("key", "update", key, "--route", " nope ").startswith(
        "keystore: unknown route ' nope '")
    cli.ok("mailbox", "add", "dave@acme.test", "--workspace", "acme", "--route", " bulk ")
    assert cli.json("mailbox", "list")[-1]["route"] == "bulk"


def test_bringing_back_an_expired_key_counts_against_the_key_limit(keystore_place):
    """Expired keys do not count against a workspace's limit, so a new key may take the
    place of one; moving the expired key's expiry (or clearing it) is then one active key
    too many, refused as `key enable` would be."""
    cli = cli_at(keystore_place)
    setup(cli)
    cli.ok("workspace", "set-limit", "acme", "1")
    old = cli.create_key("--mailbox", "alice@acme.test", "--name", "Old", "--ttl", "1h")["id"]
    age(cli, old, expires=1)
    cli.create_key("--mailbox", "alice@acme.test", "--name", "New")
    limit = ("keystore: workspace acme already has 1 active keys (limit 1); "
             "revoke unused keys or raise the limit")
    assert cli.refused("key", "update", old, "--clear", "expires") == limit
    assert cli.refused("key", "update", old, "--ttl", "30d") == limit
    assert cli.json("key", "show", old)["expires"] is not None
    cli.ok("key", "update", old, "--note", "expired, kept for the record")  # other settings change
    cli.ok("workspace", "set-limit", "acme", "2")
    assert cli.json("key", "update", old, "--clear", "expires")["expires"] is None


# ------------------------------------------------------ text for someone's terminal


def test_no_control_character_reaches_the_operators_terminal(keystore_place):
    """A limited editor token (over HTTP) writes names, notes and reasons that an owner
    later reads in a root shell: escape sequences in them must not reach the terminal."""
    cli = cli_at(keystore_place)
    setup(cli)
    assert cli.refused("key", "create", "--mailbox", "alice@acme.test", "--name", "CRM\x1b[2J") == (
        "keystore: name must not contain control characters")
    cli.ok("mailbox", "suspend", "bob@acme.test", "--reason", "abuse\x1b[2J\x1b]0;owned\x07")
    for command in (("mailbox", "list"), ("audit",)):
        out = cli.ok(*command)
        assert "\x1b" not in out and "\x07" not in out
        assert "abuse\\x1b[2J\\x1b]0;owned\\x07" in out


# ---------------------------------------------------------------------- reports


def test_expired_keys_are_neither_unused_nor_due_for_rotation(keystore_place):
    """An expired key cannot log in and no longer counts against the key limit: the
    review reports (and the FLAGS column) leave it out, as they leave disabled keys."""
    cli = cli_at(keystore_place)
    setup(cli)
    old = cli.create_key("--mailbox", "alice@acme.test", "--name", "Old", "--ttl", "1h")["id"]
    live = cli.create_key("--mailbox", "alice@acme.test", "--name", "Live")["id"]
    age(cli, old, created=200, expires=1)
    age(cli, live, created=200)
    assert [k["id"] for k in cli.json("key", "list", "--unused-for", "30d")] == [live]
    assert [k["id"] for k in cli.json("key", "list", "--not-rotated-for", "90d")] == [live]
    flags = {line.split()[0]: line.split()[-1] for line in cli.ok("key", "list").splitlines()[1:]}
    assert flags == {old: "-", live: "unused,rotation-due"}


# ----------------------------------------------------------------- admin tokens


async def test_two_replacing_token_creations_at_once_leave_one_active_token(keystore_place):
    """`admin-token create --replace` (what `make run` does at each start) run twice at
    once: both succeed, and one token of that name is active, not two."""
    cli = cli_at(keystore_place)
    cli.ok("init")
    cli.ok("admin-token", "create", "--name", "make run", "--role", "owner")
    stores = [(await open_service(cli))[0] for _ in range(2)]
    me = Actor.shell("ops")
    try:
        made = await asyncio.gather(*(
            AdminService(store).create_token(me, name="make run", role="owner", replace=True)
            for store in stores))
    finally:
        for store in stores:
            await store.close()
    active = [t for t in cli.json("admin-token", "list") if t["status"] == "active"]
    assert [t["id"] for t in active] in ([made[0][0].id], [made[1][0].id])


# ------------------------------------------------------ the previous release's trail


async def test_an_upgraded_keystore_shows_a_limited_token_its_workspaces_past(tmp_path):
    """A keystore of the previous release (schema 3) has a trail without workspaces. After
    the upgrade an acme token sees acme's past where it is certain to be acme's (its key,
    or a mailbox never removed), and nothing of globex's, nor the entries of an address
    that was removed and added again in another workspace. (sqlite's own migration: the
    PostgreSQL keystore began at the newest schema.)"""
    cli = CLI(tmp_path)
    keys.create_pepper(tmp_path / "pepper")
    with sqlite3.connect(tmp_path / "keystore.db") as db:
        run_migrations(db, MIGRATIONS[:3], what="keystore")
        db.executescript("""
            INSERT INTO workspace (id, name, key_limit, created) VALUES (1, 'acme', 100, 0),
                (2, 'globex', 100, 0);
            INSERT INTO mailbox (id, address, workspace_id, created) VALUES
                (1, 'alice@acme.test', 1, 0), (2, 'carol@globex.test', 2, 0),
                (3, 'moved@acme.test', 2, 0);
            INSERT INTO auth_key (id, name, workspace_id, mailbox_id, permissions, status, created,
                secret_hash) VALUES ('aaaaaaaaaaaa', 'CRM', 1, 1, 'email.send', 'active', 0, x'00'),
                ('bbbbbbbbbbbb', 'ESP', 2, 2, 'email.send', 'active', 0, x'00'),
                ('cccccccccccc', 'Shared', 1, NULL, 'email.send', 'active', 0, x'00');
            INSERT INTO audit (at, actor, action, key_id, mailbox, detail) VALUES
                (1, 'old', 'mailbox.add', NULL, 'alice@acme.test', 'workspace=acme'),
                (2, 'old', 'key.create', 'aaaaaaaaaaaa', 'alice@acme.test', NULL),
                (3, 'old', 'key.create', 'cccccccccccc', NULL, NULL),
                (4, 'old', 'key.delete', 'dddddddddddd', 'alice@acme.test', NULL),
                (5, 'old', 'mailbox.add', NULL, 'carol@globex.test', 'workspace=globex'),
                (6, 'old', 'key.create', 'bbbbbbbbbbbb', 'carol@globex.test', NULL),
                (7, 'old', 'mailbox.add', NULL, 'moved@acme.test', 'workspace=acme'),
                (8, 'old', 'mailbox.remove', NULL, 'moved@acme.test', NULL),
                (9, 'old', 'mailbox.add', NULL, 'moved@acme.test', 'workspace=globex'),
                (10, 'old', 'workspace.limit', NULL, NULL, 'acme key_limit=5');
        """)
    db.close()
    store, service = await open_service(cli)  # migrates to the newest schema
    try:
        acme = Actor(name="viewer", role="viewer", workspaces=frozenset({"acme"}))
        globex = Actor(name="viewer", role="viewer", workspaces=frozenset({"globex"}))
        assert [e.at for e in await service.audit(acme)] == [1, 2, 3, 4]
        assert [e.at for e in await service.audit(globex)] == [5, 6]
        assert len(await service.audit(Actor.shell("root"))) == 10
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "keystore.db") as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE audit SET actor = 'someone else'")  # still append-only
    db.close()


async def test_a_rotation_grace_past_what_a_date_holds_is_refused_before_anything_changes(keystore_place):
    """It used to commit the rotation, then crash printing the grace's end: the new secret
    was never shown and the old one (its grace ~1e24 s) worked for ever."""
    cli = cli_at(keystore_place)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    for grace in ("99999999999999999999d", "3651d"):
        refused = cli.refused("key", "rotate", key["id"], "--grace", grace)
        assert refused.startswith("keystore: a grace period is at most 3650 days"), refused
    assert "invalid duration" in cli.usage("key", "rotate", key["id"], "--grace=-5s")
    assert (await cli.login("alice@acme.test", key["secret"])).key_id == key["id"]
    assert [e["action"] for e in cli.json("audit", "--key", key["id"])] == ["key.create"]
    store, service = await open_service(cli)
    try:
        for grace in (math.inf, math.nan, -1.0, True):
            with pytest.raises(StoreError, match="a grace period is a duration, 0 or more"):
                await service.rotate_key(EDITOR, key["id"], grace=grace)
    finally:
        await store.close()
    rotated = cli.json("key", "rotate", key["id"], "--grace", "3650d")
    assert rotated["previous_valid_until"] is not None
