"""Who can send as a mailbox, and switching a whole workspace off: issue 11's keystore part.

Through the real `keystore` CLI (a subprocess on a real sqlite file) and, for a workspace
suspended while a session is open, a real relay with real TLS and a real sink.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import aiosmtplib
import pytest

from keystore.models import Identity, Reason
from keystore.schema import MIGRATIONS, migrate, run_migrations
from tests.support.procs import keystore_cli
from tests.support.refusals import refused_within
from tests.test_keystore_cli import CLI, when

SUSPENDED_REPLY = "5.7.8 Authentication credentials invalid: this mailbox is suspended"
MESSAGE = b"From: alice@example.com\r\n\r\nhi\r\n"


@pytest.fixture
def cli(tmp_path) -> CLI:
    """An initialised keystore with two mailboxes in acme and one in globex."""
    cli = CLI(tmp_path)
    cli.ok("init")
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "bob@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "carol@globex.test", "--workspace", "globex")
    return cli


def actions(cli: CLI) -> list[str]:
    return [e["action"] for e in cli.json("audit")]


# ------------------------------------------------ 1. no new keys on a suspended mailbox


async def test_key_create_on_a_suspended_mailbox_is_refused(cli):
    cli.ok("mailbox", "suspend", "alice@acme.test", "--reason", "spam")
    before = actions(cli)

    line = cli.refused("key", "create", "--mailbox", "alice@acme.test", "--name", "CRM")
    assert line == ("keystore: mailbox alice@acme.test is suspended; "
                    "resume it before creating keys for it")
    assert cli.json("key", "list") == []
    assert actions(cli) == before  # nothing audited as created

    cli.ok("mailbox", "resume", "alice@acme.test")
    made = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    assert isinstance(await cli.login("alice@acme.test", made["secret"]), Identity)


def test_key_create_in_a_suspended_workspace_is_refused(cli):
    cli.ok("workspace", "suspend", "acme")
    before = actions(cli)
    for scope in (("--mailbox", "bob@acme.test"), ("--workspace", "acme")):
        line = cli.refused("key", "create", *scope, "--name", "tool")
        assert line == ("keystore: workspace acme is suspended; "
                        "resume it before creating keys in it")
    assert cli.json("key", "list") == [] and actions(cli) == before
    cli.create_key("--mailbox", "carol@globex.test", "--name", "other workspace")  # unaffected


# ------------------------------------------------ 2. who can send as this mailbox


async def test_key_list_for_a_mailbox_includes_the_workspace_keys_that_log_in_as_it(cli):
    own = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.create_key("--mailbox", "bob@acme.test", "--name", "Bob's tool")
    shared = cli.create_key("--workspace", "acme", "--name", "Newsletter")
    cli.create_key("--workspace", "globex", "--name", "Globex tool")
    assert isinstance(await cli.login("alice@acme.test", shared["secret"]), Identity)

    listed = cli.json("key", "list", "--mailbox", "alice@acme.test")
    assert [(k["id"], k["scope"], k["mailbox"]) for k in listed] == [
        (own["id"], "mailbox:alice@acme.test", "alice@acme.test"),
        (shared["id"], "workspace:acme", None),
    ]
    table = cli.ok("key", "list", "--mailbox", "alice@acme.test").splitlines()
    assert len(table) == 3
    assert table[2].split()[:2] == [shared["id"], "Newsletter"] and "workspace:acme" in table[2]
    # the other filters still narrow it down
    assert [k["id"] for k in cli.json("key", "list", "--mailbox", "alice@acme.test",
                                      "--search", "news")] == [shared["id"]]
    assert cli.json("key", "list", "--mailbox", "carol@globex.test")[0]["name"] == "Globex tool"


def test_mailbox_list_counts_workspace_keys_separately(cli):
    cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.create_key("--workspace", "acme", "--name", "Newsletter")
    cli.create_key("--workspace", "acme", "--name", "Backups")

    by_address = {m["address"]: m for m in cli.json("mailbox", "list")}
    assert (by_address["alice@acme.test"]["keys"], by_address["alice@acme.test"]["workspace_keys"]) == (1, 2)
    assert (by_address["bob@acme.test"]["keys"], by_address["bob@acme.test"]["workspace_keys"]) == (0, 2)
    assert (by_address["carol@globex.test"]["keys"],
            by_address["carol@globex.test"]["workspace_keys"]) == (0, 0)
    table = cli.ok("mailbox", "list").splitlines()
    assert table[0].split()[:6] == ["ADDRESS", "WORKSPACE", "STATUS", "KEYS", "WORKSPACE", "KEYS"]
    assert table[1].split()[:5] == ["alice@acme.test", "acme", "active", "1", "2"]


def test_mailbox_suspend_names_the_workspace_keys_it_stops(cli):
    cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.create_key("--workspace", "acme", "--name", "Newsletter")
    cli.create_key("--workspace", "acme", "--name", "Backups")
    out = cli.ok("mailbox", "suspend", "alice@acme.test")
    assert out.strip() == ("mailbox alice@acme.test suspended; 3 key(s) stop working for it "
                           "until it is resumed (1 mailbox key(s), 2 workspace key(s) of acme)")


# ------------------------------------------------ 3. suspend and resume a workspace


async def test_workspace_suspend_and_resume(cli):
    alice = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    shared = cli.create_key("--workspace", "acme", "--name", "Newsletter")
    carol = cli.create_key("--mailbox", "carol@globex.test", "--name", "Globex")

    out = cli.ok("workspace", "suspend", "acme", "--reason", "unpaid invoice")
    assert out.strip() == ("workspace acme suspended; its 2 key(s) (1 mailbox key(s), "
                           "1 workspace key(s)) stop working until it is resumed")
    assert await cli.login("alice@acme.test", alice["secret"]) == Reason.SUSPENDED
    assert await cli.login("bob@acme.test", shared["secret"]) == Reason.SUSPENDED
    assert isinstance(await cli.login("carol@globex.test", carol["secret"]), Identity)
    # a wrong secret still learns nothing
    assert await cli.login("alice@acme.test", shared["secret"][:-8] + "AAAAAAAA") == Reason.BAD_CREDENTIALS

    listed = {w["name"]: w for w in cli.json("workspace", "list")}
    assert listed["acme"]["status"] == "suspended"
    assert listed["acme"]["suspended_reason"] == "unpaid invoice"
    assert abs(when(listed["acme"]["suspended_at"]) - time.time()) < 120
    assert listed["globex"]["status"] == "active" and listed["globex"]["suspended_at"] is None
    table = cli.ok("workspace", "list").splitlines()
    assert "STATUS" in table[0].split()
    assert table[1].split()[:2] == ["acme", "suspended"] and "unpaid invoice" in table[1]

    assert cli.refused("workspace", "suspend", "acme") == "keystore: workspace acme is already suspended"
    assert cli.refused("workspace", "suspend", "nope") == "keystore: unknown workspace: nope"

    assert cli.ok("workspace", "resume", "acme").strip() == "workspace acme resumed"
    assert isinstance(await cli.login("alice@acme.test", alice["secret"]), Identity)
    assert isinstance(await cli.login("bob@acme.test", shared["secret"]), Identity)
    assert cli.json("workspace", "list")[0]["status"] == "active"
    assert cli.refused("workspace", "resume", "acme") == "keystore: workspace acme is already active"

    events = [e for e in cli.json("audit") if e["action"].startswith("workspace.")]
    assert [(e["action"], e["actor"], e["detail"]) for e in events] == [
        ("workspace.suspend", "ops-tester", "acme reason=unpaid invoice"),
        ("workspace.resume", "ops-tester", "acme"),
    ]


async def test_suspending_a_mailbox_keeps_it_suspended_after_its_workspace_resumes(cli):
    alice = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.ok("mailbox", "suspend", "alice@acme.test")
    cli.ok("workspace", "suspend", "acme")
    cli.ok("workspace", "resume", "acme")
    assert await cli.login("alice@acme.test", alice["secret"]) == Reason.SUSPENDED


def test_a_keystore_from_before_workspace_suspension_is_upgraded_with_all_active(tmp_path):
    cli = CLI(tmp_path)
    cli.ok("init")
    db = sqlite3.connect(tmp_path / "keystore.db")
    db.execute("PRAGMA user_version = 0")  # rebuild it at the release before this one
    for table in ("audit", "alias", "auth_key", "mailbox", "workspace", "admin_token"):
        db.execute(f"DROP TABLE {table}")
    run_migrations(db, MIGRATIONS[:2], what="keystore")  # schema 3 added workspace status
    db.execute("INSERT INTO workspace (name, key_limit, created) VALUES ('acme', 5, 0)")
    db.commit()
    assert migrate(db) == len(MIGRATIONS)
    db.close()
    assert cli.json("workspace", "list") == [
        {"name": "acme", "key_limit": 5, "active_keys": 0, "mailboxes": 0, "status": "active",
         "suspended_reason": None, "suspended_at": None}]
    cli.ok("workspace", "suspend", "acme")


# ------------------------------------------------ 3. against a real relay


def _run(h, *args: str) -> None:
    result = keystore_cli(h.config_path, *args)
    assert result.returncode == 0, result.stderr


async def test_relay_refuses_every_key_of_a_suspended_workspace(h):
    await h.mailbox("alice@example.com", workspace="acme")
    await h.mailbox("bob@example.com", workspace="acme")
    await h.mailbox("carol@example.org", workspace="globex")
    mailbox_secret = await h.key("alice@example.com")
    workspace_secret = await h.key(workspace="acme")
    other_secret = await h.key("carol@example.org")

    open_session = await h.login("alice@example.com", workspace_secret)
    await open_session.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)

    await asyncio.to_thread(_run, h, "workspace", "suspend", "acme", "--reason", "unpaid")

    code, message, _ = await refused_within(open_session, 5)
    assert (code, message) in ((535, SUSPENDED_REPLY),
                               (554, "5.7.8 Message refused: this mailbox is suspended"))
    open_session.close()

    # a new AUTH gets the very 535 a suspended mailbox gets, for both kinds of key
    for username, secret in (("alice@example.com", mailbox_secret),
                             ("bob@example.com", workspace_secret)):
        client = await h.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.login(username, secret)
        assert (refused.value.code, refused.value.message) == (535, SUSPENDED_REPLY)
        client.close()
    other = await h.login("carol@example.org", other_secret)  # another workspace is untouched
    other.close()

    await asyncio.to_thread(_run, h, "workspace", "resume", "acme")
    for username, secret in (("alice@example.com", mailbox_secret),
                             ("bob@example.com", workspace_secret)):
        client = await h.login(username, secret)
        await client.sendmail(username, ["bob@example.net"], MESSAGE.replace(b"alice@example.com",
                                                                             username.encode()))
        client.close()
    await h.sink.wait_for(3)
