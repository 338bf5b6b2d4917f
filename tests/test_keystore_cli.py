"""The `keystore` admin CLI, run as a real subprocess: what an operator types and sees.

Exit status contract: 0 done, 1 refused (one line on stderr), 2 usage or configuration error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keystore.models import Identity, Reason
from keystore.opening import open_keystore
from keystore.store import KeyStore
from relay.config import load_config

CONFIG = '[keystore]\npath = "keystore.db"\npepper_file = "pepper"\n'
ACTOR = "ops-tester"


def when(text: str) -> float:
    """The CLI's UTC timestamps ("2026-01-02T03:04:05Z") as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


class CLI:
    def __init__(self, folder: Path, config_text: str = CONFIG) -> None:
        self.folder = folder
        self.config = folder / "relay.toml"
        self.config.write_text(config_text)
        self.env = {**os.environ, "KEYSTORE_ACTOR": ACTOR}
        self.env.pop("RELAY_CONFIG", None)

    def run(self, *args: str, stdin: str = "", config: Path | None | bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "keystore"]
        if config is True:
            command += ["--config", str(self.config)]
        elif config:
            command += ["--config", str(config)]
        return subprocess.run(
            [*command, *args], input=stdin, capture_output=True, text=True, cwd=self.folder,
            env=env or self.env, timeout=60,
        )

    def ok(self, *args: str, **kwargs) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, f"{args}: exit {result.returncode}: {result.stderr}"
        assert result.stderr == "", result.stderr
        return result.stdout

    def json(self, *args: str) -> object:
        return json.loads(self.ok(*args, "--json"))

    def refused(self, *args: str, **kwargs) -> str:
        """Exit 1 with exactly one line on stderr; returns that line."""
        result = self.run(*args, **kwargs)
        assert result.returncode == 1, f"{args}: exit {result.returncode}: {result.stdout} {result.stderr}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("keystore: "), result.stderr
        return lines[0]

    def usage(self, *args: str, **kwargs) -> str:
        result = self.run(*args, **kwargs)
        assert result.returncode == 2, f"{args}: exit {result.returncode}: {result.stdout} {result.stderr}"
        assert result.stderr
        return result.stderr

    def create_key(self, *args: str) -> dict:
        return self.json("key", "create", *args)

    async def login(self, username: str, secret: str) -> Identity | Reason:
        """A login as the relay makes one, on the keystore this CLI's config names."""
        ks = load_config(self.config).keystore
        store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file)
        try:
            return await store.authenticate(username, secret, "198.51.100.7")
        finally:
            await store.close()


def clone(template: Path, folder: Path) -> CLI:
    """A fresh keystore folder from a template made once per module (saves the subprocesses)."""
    for name in ("keystore.db", "pepper"):
        shutil.copy2(template / name, folder / name)
    return CLI(folder)


@pytest.fixture(scope="module")
def blank_template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blank")
    CLI(folder).ok("init")
    return folder


@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Three mailboxes in two workspaces and four keys, one of them disabled."""
    folder = tmp_path_factory.mktemp("seeded")
    cli = CLI(folder)
    cli.ok("init")
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "bob@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "carol@globex.test", "--workspace", "globex")
    made = {
        "crm": cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM sync", "--owner", "Ann Ops"),
        "billing": cli.create_key("--mailbox", "bob@acme.test", "--name", "Billing",
                                  "--note", "invoices from Zuora"),
        "newsletter": cli.create_key("--workspace", "globex", "--name", "Newsletter"),
        "old": cli.create_key("--mailbox", "carol@globex.test", "--name", "Old script"),
    }
    cli.ok("key", "disable", made["old"]["id"])
    return folder, made


@pytest.fixture
def cli(tmp_path, blank_template) -> CLI:
    """An initialised, empty keystore."""
    return clone(blank_template, tmp_path)


@pytest.fixture
def seeded(tmp_path, seeded_template) -> tuple[CLI, dict[str, dict]]:
    template, made = seeded_template
    return clone(template, tmp_path), made


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---------------------------------------------------------------------- init


def test_init_creates_private_files_and_can_be_rerun(tmp_path):
    cli = CLI(tmp_path)
    out = cli.ok("init")
    assert "created" in out and "0600" in out
    assert mode(tmp_path / "keystore.db") == 0o600
    assert mode(tmp_path / "pepper") == 0o600
    pepper = (tmp_path / "pepper").read_bytes()

    cli.ok("mailbox", "add", "a@w.test")
    out = cli.ok("init")
    assert "is up to date" in out
    assert (tmp_path / "pepper").read_bytes() == pepper
    assert "a@w.test" in cli.ok("mailbox", "list")


def test_concurrent_first_inits_all_succeed(tmp_path):
    cli = CLI(tmp_path)
    command = [sys.executable, "-m", "keystore", "--config", str(cli.config), "init"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli.env, cwd=tmp_path) for _ in range(4)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0] * 4, [err for _, _, err in results]
    # SQLite's -wal/-shm stay when the last of the racing closers could not take the
    # checkpoint lock; they are sqlite's, not stray files of ours, and share the db's mode.
    sidecars = {"keystore.db-wal", "keystore.db-shm"}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n not in sidecars] == ["keystore.db", "pepper", "relay.toml"]
    assert mode(tmp_path / "keystore.db") == mode(tmp_path / "pepper") == 0o600
    assert all(mode(tmp_path / n) == 0o600 for n in names if n in sidecars)
    cli.ok("mailbox", "add", "a@w.test")


def test_init_refuses_to_replace_a_lost_pepper(cli):
    (cli.folder / "pepper").unlink()
    line = cli.refused("init")
    assert "pepper file missing" in line
    assert not (cli.folder / "pepper").exists()


def test_commands_before_init_are_refused(tmp_path):
    cli = CLI(tmp_path)
    line = cli.refused("mailbox", "list")
    assert "keystore init" in line
    assert not (tmp_path / "keystore.db").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=lambda mode: f"{mode:04o}")
def test_pepper_readable_by_other_users_is_refused(cli, mode):
    """Group-readable too: a group is other users, and the pepper with a copy of the
    database lets them test guessed keys offline."""
    pepper = cli.folder / "pepper"
    pepper.chmod(mode)
    line = cli.refused("key", "list")
    assert f"{pepper}: the pepper file has mode {mode:04o}" in line
    assert line.endswith(f"run `chmod 600 {pepper}`")


# ---------------------------------------------------------- usage and config


@pytest.mark.parametrize(("args", "expected"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["key"], "required"),
    (["key", "create", "--mailbox", "a@w.test"], "the following arguments are required: --name"),
    (["key", "create", "--name", "x"], "one of the arguments --mailbox --workspace is required"),
    (["key", "create", "--mailbox", "a@w.test", "--workspace", "w", "--name", "x"], "not allowed with"),
    (["key", "create", "--mailbox", "a@w.test", "--name", "x", "--ttl", "5y"], "invalid duration '5y'"),
    (["key", "create", "--mailbox", "a@w.test", "--name", "x", "--ttl", "1d", "--expires", "2099-01-01"],
     "not allowed with"),
    (["key", "create", "--mailbox", "a@w.test", "--name", "x", "--expires", "next week"],
     "invalid ISO 8601"),
    (["key", "create", "--mailbox", "a@w.test", "--name", "x", "--scope", "root"], "invalid choice: 'root'"),
    (["key", "list", "--status", "sleeping"], "invalid choice: 'sleeping'"),
    (["key", "rotate", "aaaaaaaaaaaa", "--grace", "soon"], "invalid duration 'soon'"),
    (["audit", "--since", "yesterday"], "invalid ISO 8601"),
    (["workspace", "set-limit", "w", "many"], "invalid int value: 'many'"),
])
def test_usage_errors_exit_2(cli, args, expected):
    assert expected in cli.usage(*args)


def test_bad_config_is_a_usage_error(tmp_path):
    cli = CLI(tmp_path, CONFIG + "colour = \"blue\"\n")
    err = cli.usage("init")
    assert err.strip() == f"keystore: {cli.config}: [keystore]: unknown key 'colour'"
    assert not (tmp_path / "keystore.db").exists()

    assert "file not found" in cli.usage("init", config=tmp_path / "missing.toml")
    assert "pass --config PATH or set RELAY_CONFIG" in cli.usage("init", config=False)


def test_config_from_relay_config_env(tmp_path):
    cli = CLI(tmp_path)
    out = cli.ok("init", config=False, env={**cli.env, "RELAY_CONFIG": str(cli.config)})
    assert "created" in out
    assert (tmp_path / "keystore.db").exists()


# ----------------------------------------------------------------- mailboxes


def test_mailbox_add_and_list(cli):
    out = cli.ok("mailbox", "add", "Alice@Acme.test", "--workspace", "acme",
                 "--alias", "sales@acme.test", "--alias", "Info@acme.test")
    assert out.strip() == (
        "mailbox alice@acme.test added to workspace acme (aliases: info@acme.test, sales@acme.test)"
    )
    assert cli.ok("mailbox", "add", "bob@other.test").strip() == (
        "mailbox bob@other.test added to workspace default"
    )

    table = cli.ok("mailbox", "list").splitlines()
    assert table[0].split() == ["ADDRESS", "WORKSPACE", "STATUS", "KEYS", "WORKSPACE", "KEYS",
                                "ALIASES", "SUSPENDED", "LEGACY"]
    assert table[1].split() == ["alice@acme.test", "acme", "active", "0", "0", "info@acme.test",
                                "sales@acme.test", "-", "-"]
    assert table[2].split() == ["bob@other.test", "default", "active", "0", "0", "-", "-", "-"]

    listed = cli.json("mailbox", "list")
    assert [m["address"] for m in listed] == ["alice@acme.test", "bob@other.test"]
    alice = listed[0]
    assert alice["workspace"] == "acme" and alice["status"] == "active" and alice["keys"] == 0
    assert sorted(alice["aliases"]) == ["info@acme.test", "sales@acme.test"]
    assert alice["suspended_at"] is None and alice["suspended_reason"] is None
    assert abs(when(alice["created"]) - time.time()) < 120

    only_acme = cli.json("mailbox", "list", "--workspace", "acme")
    assert [m["address"] for m in only_acme] == ["alice@acme.test"]
    assert cli.json("mailbox", "list", "--workspace", "nope") == []


def test_mailbox_add_refusals(cli):
    cli.ok("mailbox", "add", "alice@acme.test", "--alias", "sales@acme.test")
    assert "already in use: alice@acme.test" in cli.refused("mailbox", "add", "ALICE@acme.test")
    assert "already in use: sales@acme.test" in cli.refused("mailbox", "add", "sales@acme.test")
    assert "invalid mailbox address" in cli.refused("mailbox", "add", "not-an-address")
    assert len(cli.json("mailbox", "list")) == 1


async def test_mailbox_suspend_and_resume(cli):
    cli.ok("mailbox", "add", "alice@acme.test")
    secret = cli.create_key("--mailbox", "alice@acme.test", "--name", "app")["secret"]

    out = cli.ok("mailbox", "suspend", "alice@acme.test", "--reason", "spam complaint")
    assert "alice@acme.test suspended" in out and "1 key(s) stop working" in out
    (listed,) = cli.json("mailbox", "list")
    assert listed["status"] == "suspended"
    assert listed["suspended_reason"] == "spam complaint"
    assert abs(when(listed["suspended_at"]) - time.time()) < 120
    assert "spam complaint" in cli.ok("mailbox", "list").splitlines()[1]
    assert await cli.login("alice@acme.test", secret) is Reason.SUSPENDED
    assert "already suspended" in cli.refused("mailbox", "suspend", "alice@acme.test")

    assert cli.ok("mailbox", "resume", "alice@acme.test").strip() == "mailbox alice@acme.test resumed"
    assert cli.json("mailbox", "list")[0]["status"] == "active"
    assert isinstance(await cli.login("alice@acme.test", secret), Identity)
    assert "already active" in cli.refused("mailbox", "resume", "alice@acme.test")
    assert "unknown mailbox: nobody@acme.test" in cli.refused("mailbox", "suspend", "nobody@acme.test")


def test_mailbox_remove(cli):
    cli.ok("mailbox", "add", "alice@acme.test")
    cli.ok("mailbox", "add", "bob@acme.test")
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "app")

    line = cli.refused("mailbox", "remove", "alice@acme.test")
    assert "has 1 key(s)" in line and "--force" in line
    assert len(cli.json("mailbox", "list")) == 2

    assert cli.ok("mailbox", "remove", "alice@acme.test", "--force").strip() == (
        "mailbox alice@acme.test removed with 1 key(s)"
    )
    assert "unknown key" in cli.refused("key", "show", key["id"])
    assert cli.ok("mailbox", "remove", "bob@acme.test").strip() == "mailbox bob@acme.test removed"
    assert cli.json("mailbox", "list") == []
    assert "unknown mailbox" in cli.refused("mailbox", "remove", "bob@acme.test")


# ---------------------------------------------------------------- key create


async def test_key_create_json_gives_a_working_secret(cli):
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM sync", "--owner", "ann",
                         "--note", "ticket 42", "--scope", "email.send", "--scope", "mailbox.read",
                         "--route", "smarthost", "--rate-limit", "20")
    assert re.fullmatch(r"[a-z2-7]{12}", key["id"])
    assert re.fullmatch(rf"rak_{key['id']}_[0-9A-Za-z]{{49}}", key["secret"])
    assert key["name"] == "CRM sync" and key["owner"] == "ann" and key["note"] == "ticket 42"
    assert key["permissions"] == ["email.send", "mailbox.read"]
    assert key["scope"] == "mailbox:alice@acme.test"
    assert (key["mailbox"], key["workspace"]) == ("alice@acme.test", "acme")
    assert key["status"] == "active" and key["expires"] is None and key["last_used"] is None
    assert key["route"] == "smarthost" and key["rate_limit"] == 20

    identity = await cli.login("alice@acme.test", key["secret"])
    assert isinstance(identity, Identity)
    assert identity.key_id == key["id"] and identity.route == "smarthost"
    assert identity.permissions == {"email.send", "mailbox.read"}
    # the secret is never stored or shown again
    assert key["secret"] not in cli.ok("key", "show", key["id"], "--json")
    assert "secret" not in cli.json("key", "show", key["id"])


async def test_key_create_text_output(cli):
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "bob@acme.test", "--workspace", "acme")
    out = cli.ok("key", "create", "--mailbox", "alice@acme.test", "--name", "CRM")
    lines = out.splitlines()
    assert re.fullmatch(r"created key [a-z2-7]{12} \('CRM', mailbox:alice@acme\.test\)", lines[0])
    secret = next(line.strip() for line in lines if line.strip().startswith("rak_"))
    assert "only time the key is shown" in out
    assert "SMTP username: alice@acme.test" in out
    assert isinstance(await cli.login("alice@acme.test", secret), Identity)

    out = cli.ok("key", "create", "--workspace", "acme", "--name", "Newsletter")
    assert "workspace:acme" in out.splitlines()[0]
    assert "SMTP username: any mailbox address of workspace acme" in out
    secret = next(line.strip() for line in out.splitlines() if line.strip().startswith("rak_"))
    for address in ("alice@acme.test", "bob@acme.test"):
        identity = await cli.login(address, secret)
        assert isinstance(identity, Identity) and identity.mailbox == address


async def test_key_create_expiry(cli):
    cli.ok("mailbox", "add", "alice@acme.test")
    by_date = cli.create_key("--mailbox", "alice@acme.test", "--name", "a", "--expires", "2099-01-01")
    assert by_date["expires"] == "2099-01-01T00:00:00Z"
    with_offset = cli.create_key("--mailbox", "alice@acme.test", "--name", "b",
                                 "--expires", "2099-06-30T12:00:00+02:00")
    assert with_offset["expires"] == "2099-06-30T10:00:00Z"
    by_ttl = cli.create_key("--mailbox", "alice@acme.test", "--name", "c", "--ttl", "2h")
    assert abs(when(by_ttl["expires"]) - (time.time() + 7200)) < 120
    assert isinstance(await cli.login("alice@acme.test", by_ttl["secret"]), Identity)

    assert "expiry is in the past" in cli.refused(
        "key", "create", "--mailbox", "alice@acme.test", "--name", "d", "--expires", "2001-01-01")
    assert "2099-01-01T00:00:00Z" in cli.ok("key", "show", by_date["id"])


def test_key_create_refusals(cli):
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    assert "unknown mailbox: nobody@acme.test" in cli.refused(
        "key", "create", "--mailbox", "nobody@acme.test", "--name", "x")
    assert "unknown workspace: nope" in cli.refused("key", "create", "--workspace", "nope", "--name", "x")
    assert "descriptive name" in cli.refused("key", "create", "--workspace", "acme", "--name", "  ")
    assert "at least 1" in cli.refused(
        "key", "create", "--workspace", "acme", "--name", "x", "--rate-limit", "0")
    assert cli.json("key", "list") == []


def test_key_create_checks_routes_against_the_configured_upstreams(tmp_path):
    cli = CLI(tmp_path, CONFIG + '\n[[upstream]]\nname = "smarthost"\nhost = "127.0.0.1"\n')
    cli.ok("init")
    line = cli.refused("mailbox", "add", "a@w.test", "--route", "elsewhere")
    assert "unknown route 'elsewhere'" in line and "smarthost" in line
    cli.ok("mailbox", "add", "a@w.test", "--route", "smarthost")
    assert "unknown route" in cli.refused(
        "key", "create", "--mailbox", "a@w.test", "--name", "x", "--route", "elsewhere")
    assert cli.create_key("--mailbox", "a@w.test", "--name", "x", "--route", "smarthost")["route"] == (
        "smarthost"
    )


# ----------------------------------------------------------- list and show


def ids(listed) -> list[str]:
    return [k["id"] for k in listed]


def test_key_list_filters_and_search(seeded):
    cli, keys = seeded
    crm, billing, newsletter, old = (keys[n]["id"] for n in ("crm", "billing", "newsletter", "old"))
    everything = cli.json("key", "list")
    assert ids(everything) == [crm, billing, newsletter, old]
    assert all("secret" not in k for k in everything)
    assert ids(cli.json("key", "list", "--mailbox", "ALICE@acme.test")) == [crm]
    assert ids(cli.json("key", "list", "--workspace", "acme")) == [crm, billing]
    assert ids(cli.json("key", "list", "--workspace", "globex")) == [newsletter, old]
    assert ids(cli.json("key", "list", "--status", "disabled")) == [old]
    assert ids(cli.json("key", "list", "--status", "active", "--workspace", "globex")) == [newsletter]
    assert cli.json("key", "list", "--status", "revoked") == []

    for needle, expected in [
        ("crm", [crm]),               # name, any case
        ("ann ops", [crm]),           # owner
        ("ZUORA", [billing]),         # note
        ("bob@", [billing]),          # mailbox
        ("globex", [newsletter, old]),  # workspace (and carol's mailbox address)
        (old, [old]),                 # the key id itself
        ("no such thing", []),
    ]:
        assert ids(cli.json("key", "list", "--search", needle)) == expected, needle

    table = cli.ok("key", "list", "--search", "billing").splitlines()
    assert table[0].split() == ["ID", "NAME", "STATUS", "SCOPE", "OWNER", "CREATED", "EXPIRES",
                                "LAST", "USED", "ROTATED", "FLAGS"]
    assert len(table) == 2
    assert table[1].split()[:4] == [billing, "Billing", "active", "mailbox:bob@acme.test"]


def test_key_show(seeded):
    cli, keys = seeded
    crm = keys["crm"]
    out = cli.ok("key", "show", crm["id"])
    for label, value in [("id", crm["id"]), ("name", "CRM sync"), ("status", "active"),
                         ("scope", "mailbox:alice@acme.test"), ("permissions", "email.send"),
                         ("owner", "Ann Ops"), ("expires", "-"), ("last used", "-")]:
        assert re.search(rf"^{label}:\s+{re.escape(value)}$", out, re.M), (label, out)

    shown = cli.json("key", "show", crm["id"])
    assert shown == {k: v for k, v in crm.items() if k != "secret"}
    assert cli.json("key", "show", keys["newsletter"]["id"])["scope"] == "workspace:globex"
    assert "unknown key: aaaaaaaaaaaa" in cli.refused("key", "show", "aaaaaaaaaaaa")


async def test_key_show_reports_last_use(seeded):
    cli, keys = seeded
    assert isinstance(await cli.login("alice@acme.test", keys["crm"]["secret"]), Identity)
    shown = cli.json("key", "show", keys["crm"]["id"])
    assert shown["last_ip"] == "198.51.100.7"
    assert abs(when(shown["last_used"]) - time.time()) < 120
    assert re.search(r"^last client:\s+198\.51\.100\.7$", cli.ok("key", "show", keys["crm"]["id"]), re.M)


# ------------------------------------------------------ status and rotation


async def test_disable_enable_revoke(seeded):
    cli, keys = seeded
    key_id, secret = keys["crm"]["id"], keys["crm"]["secret"]
    assert cli.ok("key", "disable", key_id).strip() == f"key {key_id} ('CRM sync') is now disabled"
    assert await cli.login("alice@acme.test", secret) is Reason.DISABLED
    assert "already disabled" in cli.refused("key", "disable", key_id)

    assert cli.ok("key", "enable", key_id).strip() == f"key {key_id} ('CRM sync') is now active"
    assert isinstance(await cli.login("alice@acme.test", secret), Identity)

    assert cli.ok("key", "revoke", key_id).strip() == f"key {key_id} ('CRM sync') is now revoked"
    assert await cli.login("alice@acme.test", secret) is Reason.REVOKED
    assert "revocation is permanent" in cli.refused("key", "enable", key_id)
    assert "revoked" in cli.refused("key", "disable", key_id)
    assert cli.json("key", "show", key_id)["status"] == "revoked"
    assert "unknown key" in cli.refused("key", "revoke", "aaaaaaaaaaaa")


async def test_rotate(seeded):
    cli, keys = seeded
    key_id, old = keys["crm"]["id"], keys["crm"]["secret"]
    rotated = cli.json("key", "rotate", key_id)
    new = rotated["secret"]
    assert new != old and new.startswith(f"rak_{key_id}_")
    assert rotated["id"] == key_id and rotated["previous_valid_until"] is None
    assert abs(when(rotated["rotated"]) - time.time()) < 120
    assert await cli.login("alice@acme.test", old) is Reason.BAD_CREDENTIALS
    assert isinstance(await cli.login("alice@acme.test", new), Identity)

    graced = cli.json("key", "rotate", key_id, "--grace", "1h")
    assert abs(when(graced["previous_valid_until"]) - (time.time() + 3600)) < 120
    assert isinstance(await cli.login("alice@acme.test", new), Identity)
    assert isinstance(await cli.login("alice@acme.test", graced["secret"]), Identity)

    out = cli.ok("key", "rotate", key_id, "--grace", "10m")
    assert out.startswith(f"rotated key {key_id} ('CRM sync', mailbox:alice@acme.test)")
    until = re.search(r"^The previous secret is valid until: (\S+)$", out, re.M)
    assert until and abs(when(until.group(1)) - (time.time() + 600)) < 120
    out = cli.ok("key", "rotate", key_id)
    assert "The previous secret is valid until: no longer (stopped now)" in out

    cli.ok("key", "revoke", key_id)
    assert "cannot be rotated" in cli.refused("key", "rotate", key_id)


def test_delete(seeded):
    cli, keys = seeded
    crm, billing = keys["crm"]["id"], keys["billing"]["id"]
    assert cli.ok("key", "delete", crm, "--yes").strip() == f"key {crm} ('CRM sync') deleted"
    assert "unknown key" in cli.refused("key", "show", crm)

    result = cli.run("key", "delete", billing, stdin="Billing-ish\n")
    assert result.returncode == 1
    assert result.stdout == ""  # the question is asked on stderr
    assert result.stderr == (f"Deleting key {billing} cannot be undone. Type its name (Billing) to confirm: "
                             "keystore: confirmation did not match the key's name; nothing deleted\n")
    result = cli.run("key", "delete", billing, stdin="")
    assert result.returncode == 1 and result.stderr.endswith("nothing deleted\n")
    assert cli.json("key", "show", billing)["name"] == "Billing"

    result = cli.run("key", "delete", billing, stdin="Billing\n")
    assert result.returncode == 0, result.stderr
    assert f"key {billing} ('Billing') deleted" in result.stdout
    assert ids(cli.json("key", "list")) == [keys["newsletter"]["id"], keys["old"]["id"]]
    assert "unknown key" in cli.refused("key", "delete", billing, "--yes")


# --------------------------------------------------------------------- audit


def test_audit(cli):
    start = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # the form the CLI prints
    cli.ok("mailbox", "add", "alice@acme.test")
    cli.ok("mailbox", "add", "bob@acme.test")
    key = cli.create_key("--mailbox", "alice@acme.test", "--name", "CRM")
    cli.ok("key", "revoke", key["id"])
    cli.ok("mailbox", "suspend", "bob@acme.test", "--reason", "left the company")

    events = cli.json("audit")
    assert [e["action"] for e in events] == [
        "mailbox.add", "mailbox.add", "key.create", "key.revoke", "mailbox.suspend",
    ]
    assert {e["actor"] for e in events} == {ACTOR}
    assert all(abs(when(e["at"]) - time.time()) < 120 for e in events)
    assert events[-1]["detail"] == "left the company" and events[-1]["mailbox"] == "bob@acme.test"
    assert set(events[0]) >= {"id", "at", "actor", "action", "key_id", "mailbox", "detail"}

    assert [e["action"] for e in cli.json("audit", "--key", key["id"])] == ["key.create", "key.revoke"]
    assert [e["action"] for e in cli.json("audit", "--mailbox", "BOB@acme.test")] == [
        "mailbox.add", "mailbox.suspend",
    ]
    assert len(cli.json("audit", "--since", start)) == 5
    assert len(cli.json("audit", "--since", "2000-01-01")) == 5
    assert cli.json("audit", "--since", "2999-01-01") == []

    table = cli.ok("audit", "--key", key["id"]).splitlines()
    assert table[0].split() == ["WHEN", "ACTOR", "ACTION", "KEY", "MAILBOX", "DETAIL"]
    assert table[2].split()[1:5] == [ACTOR, "key.revoke", key["id"], "alice@acme.test"]


# ------------------------------------------------------- backup, workspaces


async def test_backup(seeded):
    cli, keys = seeded
    out = cli.ok("backup", "saved/keystore-copy.db")
    assert "saved/keystore-copy.db" in out
    copy = cli.folder / "saved" / "keystore-copy.db"
    assert mode(copy) == 0o600

    store = await KeyStore.open(copy, cli.folder / "pepper")
    try:
        assert {k.id for k in await store.list_keys()} == {k["id"] for k in keys.values()}
        identity = await store.authenticate("alice@acme.test", keys["crm"]["secret"], "192.0.2.1")
        assert isinstance(identity, Identity)
    finally:
        await store.close()

    other = CLI(cli.folder / "saved", '[keystore]\npath = "keystore-copy.db"\npepper_file = "../pepper"\n')
    assert ids(other.json("key", "list")) == [keys[n]["id"] for n in ("crm", "billing", "newsletter", "old")]

    before = copy.read_bytes()
    assert "already exists" in cli.refused("backup", str(copy))
    assert copy.read_bytes() == before


def test_workspace_list_and_set_limit(cli):
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "bob@acme.test", "--workspace", "acme")
    cli.ok("mailbox", "add", "carol@globex.test", "--workspace", "globex")
    cli.create_key("--mailbox", "alice@acme.test", "--name", "one")

    active = {"status": "active", "suspended_reason": None, "suspended_at": None}
    assert cli.json("workspace", "list") == [
        {"name": "acme", "key_limit": 100, "active_keys": 1, "mailboxes": 2, **active},
        {"name": "globex", "key_limit": 100, "active_keys": 0, "mailboxes": 1, **active},
    ]
    table = cli.ok("workspace", "list").splitlines()
    assert table[0].split() == ["WORKSPACE", "STATUS", "MAILBOXES", "ACTIVE", "KEYS", "KEY", "LIMIT",
                                "SUSPENDED"]
    assert table[1].split() == ["acme", "active", "2", "1", "100", "-"]

    assert cli.ok("workspace", "set-limit", "acme", "2").strip() == "workspace acme: at most 2 active keys"
    cli.create_key("--workspace", "acme", "--name", "two")
    line = cli.refused("key", "create", "--mailbox", "bob@acme.test", "--name", "three")
    assert "already has 2 active keys (limit 2)" in line
    assert cli.json("workspace", "list")[0]["key_limit"] == 2
    assert "unknown workspace: nope" in cli.refused("workspace", "set-limit", "nope", "5")
    limits = [e for e in cli.json("audit") if e["action"] == "workspace.limit"]
    assert [e["detail"] for e in limits] == ["acme key_limit=2"]


def test_negative_key_limit_is_refused(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "relay.toml"
    config.write_text('[keystore]\npath = "k.db"\npepper_file = "pepper"\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "keystore", "--config", str(config), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=30)
    assert run("init").returncode == 0
    assert run("mailbox", "add", "a@example.com", "--workspace", "w").returncode == 0
    result = run("workspace", "set-limit", "w", "--", "-1")
    assert result.returncode == 1
    assert result.stderr.strip() == "keystore: a key limit is a number of active keys, 0 or more"
