"""The key operations issue 11 added to the CLI (and, through the one service layer, to the
HTTP API): key update, revoke by owner or mailbox, the unused / not-rotated reports, admin
tokens. Run as a real subprocess, as an operator types them, on a sqlite keystore and on a
PostgreSQL one (`keystore_place`)."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import psycopg

from keystore import keys
from keystore.models import Reason
from keystore.pg import to_pg
from relay.config import load_config
from tests.support.keystores import KeystorePlace
from tests.test_keystore_cli import ACTOR, CLI

DAY = 86400.0
ROUTING = (
    '[routing]\ndefault = "main"\n'
    '[[upstream]]\nname = "main"\nhost = "127.0.0.1"\nport = 2525\ntls = "none"\n'
    '[[upstream]]\nname = "bulk"\nhost = "127.0.0.1"\nport = 2526\ntls = "none"\n'
)
ROUTED = CLI.__init__.__defaults__[0] + ROUTING


def cli_at(place: KeystorePlace, *, routed: bool = False) -> CLI:
    """The CLI on `place`'s keystore; `routed`: with the upstreams main and bulk."""
    return CLI(place.folder, place.config_lines() + (ROUTING if routed else ""))


def write_behind_the_cli(cli: CLI, sql: str, params: tuple) -> None:
    """A change no command makes, straight into the CLI's keystore (either engine)."""
    url = load_config(cli.config).keystore.url
    if url is None:
        with contextlib.closing(sqlite3.connect(cli.folder / "keystore.db")) as db, db:
            db.execute(sql, params)
    else:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(to_pg(sql), params)


def setup(cli: CLI) -> None:
    cli.ok("init")
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "bob@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "carol@globex.test", "--workspace", "globex")


def age(cli: CLI, key_id: str, **columns: float) -> None:
    """Make a key look `columns` old (created / last_used / rotated, in days ago): the only
    way to have a 40-day-old key in a test without a clock of our own."""
    now = time.time()
    for column, days in columns.items():
        write_behind_the_cli(cli, f"UPDATE auth_key SET {column} = ? WHERE id = ?",
                             (now - days * DAY, key_id))


# ------------------------------------------------------------------ key update


def test_key_update_changes_settings_keeps_the_name_and_is_audited(keystore_place):
    cli = cli_at(keystore_place, routed=True)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM", "--owner", "dana",
                         "--note", "sync job", "--route", "main", "--rate-limit", "30")
    out = cli.ok("key", "update", key["id"], "--route", "bulk", "--rate-limit", "90", "--owner", "erin",
                 "--note", "nightly", "--expires", "2099-01-02", "--allow-from", "192.0.2.0/24",
                 "--allow-from", "2001:db8::/48")
    assert out == (f"key {key['id']} ('CRM') updated: route bulk, rate-limit 90, owner erin, note nightly, "
                   "allow-from 192.0.2.0/24 2001:db8::/48, expires 2099-01-02T00:00:00Z\n")
    shown = cli.json("key", "show", key["id"])
    assert (shown["name"], shown["route"], shown["rate_limit"], shown["owner"], shown["note"]) == (
        "CRM", "bulk", 90, "erin", "nightly")
    assert shown["allow_from"] == ["192.0.2.0/24", "2001:db8::/48"]
    assert shown["expires"] == "2099-01-02T00:00:00Z"
    assert "secret" not in shown and "secret_hash" not in shown

    cleared = cli.json("key", "update", key["id"], "--clear", "route", "--clear", "rate-limit",
                       "--clear", "expires", "--clear", "note")
    assert (cleared["route"], cleared["rate_limit"], cleared["expires"], cleared["note"]) == (
        None, None, None, None)
    assert cleared["owner"] == "erin"

    trail = [e for e in cli.json("audit", "--key", key["id"]) if e["action"] == "key.update"]
    assert [e["actor"] for e in trail] == [ACTOR, ACTOR]
    assert trail[0]["detail"] == ("route='bulk' rate_limit=90 owner='erin' note='nightly' "
                                  "allow_from=192.0.2.0/24,2001:db8::/48 expires=2099-01-02T00:00:00Z")
    assert trail[1]["detail"] == "route=- rate_limit=- expires=- note=-"


def test_key_update_refusals(keystore_place):
    cli = cli_at(keystore_place, routed=True)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")["id"]
    assert cli.refused("key", "update", key, "--route", "nope") == (
        "keystore: unknown route 'nope': no [[upstream]] or [[group]] of that name (have: main, bulk)")
    assert cli.refused("key", "update", key, "--rate-limit", "0") == (
        "keystore: a rate limit is a number of messages per minute, at least 1")
    assert cli.refused("key", "update", key, "--expires", "2001-01-01") == "keystore: expiry is in the past"
    assert cli.refused("key", "update", key, "--allow-from", "10.0.0.1/8").startswith(
        "keystore: allow-from '10.0.0.1/8' is not a network in CIDR notation")
    assert "key update: nothing to change" in cli.usage("key", "update", key)
    assert cli.refused("key", "update", "aaaaaaaaaaaa", "--note", "x") == (
        "keystore: unknown key: aaaaaaaaaaaa")
    assert "together" in cli.usage("key", "update", key, "--note", "x", "--clear", "note")
    assert "--name" in cli.usage("key", "update", key, "--name", "Other")  # the name stays
    cli.ok("key", "revoke", key)
    assert cli.refused("key", "update", key, "--note", "x") == (
        f"keystore: key {key} is revoked; a revoked key cannot be changed")
    assert [e["action"] for e in cli.json("audit", "--key", key)] == ["key.create", "key.revoke"]


async def test_key_update_rate_limit_and_expiry_reach_the_login(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.ok("key", "update", key["id"], "--rate-limit", "7")
    identity = await cli.login("alice@acme.test", key["secret"])
    assert identity.rate_limit == 7
    # an expiry seconds ahead (time for a loaded machine to start the CLI before it): the
    # key stops at it (waited for, not slept)
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 5))
    cli.ok("key", "update", key["id"], "--expires", soon)
    deadline = time.time() + 15
    while await cli.login("alice@acme.test", key["secret"]) is not Reason.EXPIRED:
        assert time.time() < deadline, "the key did not expire"


# --------------------------------------------------------- revoke by owner / mailbox


def test_revoke_every_key_of_an_owner(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    a = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM", "--owner", "Dana")["id"]
    b = cli.create_key("--mailbox", "carol@globex.test", "--name", "ESP", "--owner", "dana")["id"]
    c = cli.create_key("--workspace", "acme", "--name", "Sequencer", "--owner", "DANA")["id"]
    other = cli.create_key("--mailbox", "bob@acme.test", "--name", "Billing", "--owner", "erin")["id"]
    gone = cli.create_key("--mailbox", "bob@acme.test", "--name", "Old", "--owner", "dana")["id"]
    cli.ok("key", "revoke", gone)

    # asked first: anything but 'revoke' changes nothing
    out = cli.run("key", "revoke", "--owner", "dana", stdin="yes\n")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.endswith("Type 'revoke' to confirm: keystore: not confirmed; nothing revoked\n")
    assert f"\n  {a}  CRM  (mailbox:alice@acme.test)\n" in out.stderr
    assert out.stderr.startswith("These 3 key(s) will be revoked, for good:\n")
    assert {k["id"] for k in cli.json("key", "list", "--status", "revoked")} == {gone}

    out = cli.run("key", "revoke", "--owner", "dana", stdin="revoke\n")
    assert out.returncode == 0 and out.stdout.endswith("3 key(s) revoked\n")
    statuses = {k["id"]: k["status"] for k in cli.json("key", "list")}
    assert statuses == {a: "revoked", b: "revoked", c: "revoked", other: "active", gone: "revoked"}
    revocations = [e for e in cli.json("audit") if e["action"] == "key.revoke" and e["key_id"] != gone]
    assert {e["key_id"] for e in revocations} == {a, b, c}
    assert {e["detail"] for e in revocations} == {"with every key of owner 'dana'"}

    assert cli.refused("key", "revoke", "--owner", "dana", "--yes") == (
        "keystore: no keys to revoke for owner 'dana' (none, or all revoked already)")
    assert "give one of" in cli.usage("key", "revoke", a, "--owner", "erin")
    assert "give one of" in cli.usage("key", "revoke")


async def test_revoke_by_mailbox_leaves_workspace_keys(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    own = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    shared = cli.create_key("--workspace", "acme", "--name", "Sequencer")
    bobs = cli.create_key("--mailbox", "bob@acme.test", "--name", "Billing")
    revoked = cli.json("key", "revoke", "--mailbox", "ALICE@acme.test", "--yes")
    assert [k["id"] for k in revoked] == [own["id"]]
    assert await cli.login("alice@acme.test", own["secret"]) is Reason.REVOKED
    assert (await cli.login("alice@acme.test", shared["secret"])).key_id == shared["id"]
    assert (await cli.login("bob@acme.test", bobs["secret"])).key_id == bobs["id"]
    assert cli.refused("key", "revoke", "--mailbox", "nobody@acme.test", "--yes") == (
        "keystore: unknown mailbox: nobody@acme.test")


# ------------------------------------------------------------------- reports


def test_unused_and_not_rotated_reports(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    fresh = cli.create_key("--mailbox", "alice@acme.test", "--name", "Fresh")["id"]
    idle = cli.create_key("--mailbox", "alice@acme.test", "--name", "Idle")["id"]
    used = cli.create_key("--mailbox", "bob@acme.test", "--name", "Used")["id"]
    never = cli.create_key("--mailbox", "bob@acme.test", "--name", "Never")["id"]
    rotated = cli.create_key("--mailbox", "carol@globex.test", "--name", "Rotated")["id"]
    off = cli.create_key("--mailbox", "carol@globex.test", "--name", "Off")["id"]
    age(cli, idle, created=200, last_used=45)
    age(cli, used, created=200, last_used=2)
    age(cli, never, created=31)
    age(cli, rotated, created=200, rotated=10, last_used=0.1)
    age(cli, off, created=300)
    cli.ok("key", "disable", off)  # not active: nothing to clean up for either report

    def ids(*args: str) -> list[str]:
        return [k["id"] for k in cli.json("key", "list", *args)]

    assert set(ids("--unused-for", "30d")) == {idle, never}
    assert set(ids("--not-rotated-for", "90d")) == {idle, used}
    assert ids("--not-rotated-for", "90d", "--workspace", "globex") == []
    assert set(ids("--unused-for", "1d")) == {idle, used, never}
    assert fresh not in ids("--unused-for", "1h")

    table = cli.ok("key", "list").splitlines()
    flags = {line.split()[0]: line.split()[-1] for line in table[1:]}
    assert flags[idle] == "unused,rotation-due"
    assert flags[never] == "unused"
    assert flags[used] == "rotation-due"
    assert flags[fresh] == "-" and flags[off] == "-"
    assert "invalid duration" in cli.usage("key", "list", "--unused-for", "a month")


# ---------------------------------------------------------------- admin tokens


def test_admin_tokens_are_shown_once_stored_hashed_and_revocable(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    made = cli.json("admin-token", "create", "--name", "provisioning", "--role", "editor",
                    "--workspace", "acme")
    secret = made.pop("secret")
    assert secret.startswith("rat_") and keys.parse_key(secret, keys.TOKEN_PREFIX) is not None
    assert keys.parse_key(secret) is None  # not a key: the relay's AUTH refuses it unread
    assert made["role"] == "editor" and made["workspaces"] == ["acme"]
    assert made["created_by"] == ACTOR and made["status"] == "active"

    text = cli.ok("admin-token", "create", "--name", "auditor", "--role", "viewer")
    assert "created admin token" in text and "viewer of every workspace" in text
    shown = [line.strip() for line in text.splitlines() if line.strip().startswith("rat_")]
    assert len(shown) == 1

    listed = cli.json("admin-token", "list")
    assert [t["name"] for t in listed] == ["provisioning", "auditor"]
    assert all("secret" not in t and "secret_hash" not in t for t in listed)
    table = cli.ok("admin-token", "list")
    assert secret not in table and shown[0] not in table
    if keystore_place.url is None:
        database = b"".join(p.read_bytes() for p in keystore_place.folder.glob("keystore.db*"))
    else:
        with psycopg.connect(keystore_place.url) as db:
            database = "".join(to_jsonb for (to_jsonb,) in db.execute(
                "SELECT to_jsonb(t)::text FROM admin_token t UNION ALL "
                "SELECT to_jsonb(a)::text FROM audit a")).encode()
        assert made["id"].encode() in database
    assert secret.encode() not in database and secret.split("_")[2][:43].encode() not in database

    assert cli.ok("admin-token", "revoke", made["id"]).startswith(
        f"admin token {made['id']} ('provisioning') revoked")
    assert cli.refused("admin-token", "revoke", made["id"]) == (
        f"keystore: admin token {made['id']} is already revoked")
    trail = [(e["action"], e["actor"]) for e in cli.json("audit") if e["action"].startswith("token.")]
    assert trail == [("token.create", ACTOR), ("token.create", ACTOR), ("token.revoke", ACTOR)]


def test_admin_token_refusals(keystore_place):
    cli = cli_at(keystore_place)
    setup(cli)
    assert cli.refused("admin-token", "create", "--name", "x", "--role", "owner", "--workspace", "acme") == (
        "keystore: an owner token covers every workspace; give --workspace to viewers and editors only")
    assert cli.refused("admin-token", "create", "--name", "x", "--role", "editor", "--workspace", "acne") == (
        "keystore: unknown workspace: acne")
    assert cli.refused("admin-token", "create", "--name", " ", "--role", "viewer") == (
        "keystore: an admin token needs a name saying who or what uses it")
    assert "invalid choice" in cli.usage("admin-token", "create", "--name", "x", "--role", "admin")
    assert cli.refused("admin-token", "revoke", "aaaaaaaaaaaa") == (
        "keystore: unknown admin token: aaaaaaaaaaaa")
    assert cli.json("admin-token", "list") == []


def test_replace_revokes_the_active_tokens_of_that_name(keystore_place):
    """What `make run` does at each start: one dev owner token, not one more per start."""
    cli = cli_at(keystore_place)
    cli.ok("init")
    first = cli.json("admin-token", "create", "--name", "make run", "--role", "owner")
    second = cli.json("admin-token", "create", "--name", "make run", "--role", "owner", "--replace")
    statuses = {t["id"]: t["status"] for t in cli.json("admin-token", "list")}
    assert statuses == {first["id"]: "revoked", second["id"]: "active"}



def test_a_new_workspace_name_is_one_a_url_a_table_and_a_log_line_can_hold(keystore_place):
    """`a/b` could never be named over HTTP (two path segments), `..` is normalised away by
    clients, a newline forges a table row: refused when the workspace would be created."""
    cli = cli_at(keystore_place)
    cli.ok("init")
    for name in ("a/b", "..", "x\ny", "<b>", "sales team", ".x", "w" * 65):
        assert cli.refused("mailbox", "add", "m@example.com", f"--workspace={name}").startswith(
            f"keystore: invalid workspace name {name!r}: use letters, digits"), name
    assert cli.json("workspace", "list") == []
    cli.ok("mailbox", "add", "m@example.com", "--workspace", "Sales_2.eu-west")
    assert [w["name"] for w in cli.json("workspace", "list")] == ["Sales_2.eu-west"]
