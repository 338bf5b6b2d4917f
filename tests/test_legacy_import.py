"""Importing legacy passwords (issue 13), end to end: `keystore import dovecot-passwd` and
`keystore import htpasswd` run as real processes on files of hashes made by Dovecot's own
`doveadm pw` and Apache's `htpasswd`, then `keystore legacy list/expire/convert` and the
listings and audit trail an operator reads afterwards. The store-level tests at the end run
on both engines (`keystore_place`): the import is one transaction, one live legacy password
per mailbox, and a converted password is retired only once its key has been used.

Logins through the relay and the verifier's pool are tested elsewhere
(tests/test_legacy_login.py, tests/test_legacy_hostile.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from passlib.hash import bcrypt, sha512_crypt

from keystore.legacy import BadLine, LegacyEntry
from keystore.models import Identity, Reason
from keystore.passwdfile import read_dovecot_passwd
from keystore.service import Actor, AdminService
from keystore.store import Conflict, KeyStore, StoreError
from tests.support.waiting import wait_until
from tests.test_keystore_cli import ACTOR, CLI, clone, when

# Each user's password, and the Dovecot scheme its hash is made in.
USERS = {
    "alice@example.com": ("SHA512-CRYPT", "Alice-old-pw-1"),
    "bob@example.com": ("BLF-CRYPT", "Bob-old-pw-2"),
    "carol": ("ARGON2ID", "Carol-old-pw-3"),  # no domain: --domain example.com
    "dave@other.test": ("SHA256-CRYPT", "Dave-old-pw-4"),
}
SUMMARY_FOUR = ("imported from users.passwd: 4 legacy password(s) created, 0 updated, "
                "0 unchanged, 4 new mailbox(es)")


def doveadm_pw(scheme: str, password: str) -> str:
    """`{SCHEME}hash`, as Dovecot's passwd-file holds it."""
    done = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.strip()


def htpasswd_line(user: str, password: str, *options: str) -> str:
    """`htpasswd -nb... user password`: `user:hash`."""
    done = subprocess.run(["htpasswd", "-nb", *options, user, password], capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """Each user's `{SCHEME}hash` (argon2 costs 0.2 s: made once per module)."""
    return {user: doveadm_pw(scheme, password) for user, (scheme, password) in USERS.items()}


@pytest.fixture(scope="module")
def weak() -> dict[str, str]:
    """Hashes the import refuses, made by the real tools."""
    return {
        "plain-md5": doveadm_pw("PLAIN-MD5", "Weak-pw-md5"),
        "des-crypt": htpasswd_line("x", "Weak-pw-des", "-d").partition(":")[2],  # 13 characters
        "md5-crypt": doveadm_pw("MD5-CRYPT", "Weak-pw-md5crypt").removeprefix("{MD5-CRYPT}"),
        "apr1": htpasswd_line("x", "Weak-pw-apr1", "-m").partition(":")[2],
        "ssha512": doveadm_pw("SSHA512", "Weak-pw-ssha"),
        "good": doveadm_pw("SHA512-CRYPT", "Good-pw-0"),
        "other": doveadm_pw("SHA512-CRYPT", "Other-pw-9"),
    }


def passwd_text(hashes: dict[str, str]) -> str:
    """A Dovecot passwd-file as operators keep them: comments, blank lines, the unused
    uid/gid/gecos/home/shell fields, and an extra field with an IPv6 network (its colons)."""
    return "\n".join([
        "# mail users, moved from the old server",
        "",
        f"alice@example.com:{hashes['alice@example.com']}:::::: allow_nets=192.0.2.0/24,2001:db8::/32",
        f"bob@example.com:{hashes['bob@example.com']}",
        "   ",
        f"carol:{hashes['carol']}:1000:1000:Carol C:/home/carol:/bin/false",
        "# dave is on the other domain",
        f"dave@other.test:{hashes['dave@other.test']}::::::",
        "",
    ])


def secrets_of(hashes: dict[str, str]) -> list[str]:
    """What must never appear in any output: each password, each hash (and its hash part)."""
    found = [password for _, password in USERS.values()]
    for value in hashes.values():
        found += [value, value.rpartition("}")[2]]
    return found


def no_secret(result: subprocess.CompletedProcess[str] | str, secrets: list[str]) -> None:
    text = result if isinstance(result, str) else result.stdout + result.stderr
    for secret in secrets:
        assert secret not in text


def table(output: str) -> list[dict[str, str]]:
    """A CLI table as rows of {HEADER: cell}, cut at the headers' columns (a header such as
    "LAST USED" has a space; columns are two spaces apart)."""
    header, *lines = output.splitlines()
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    rows = []
    for line in lines:
        bounds = [start for start, _ in starts[1:]] + [None]
        rows.append({name: line[start:end].strip()
                     for (start, name), end in zip(starts, bounds, strict=True)})
    return rows


@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory) -> Path:
    """A keystore with one mailbox already here (real@example.com, alias sales@example.com)."""
    folder = tmp_path_factory.mktemp("legacy-seeded")
    cli = CLI(folder)
    cli.ok("init")
    cli.ok("mailbox", "add", "real@example.com", "--workspace", "example.com",
           "--alias", "sales@example.com")
    return folder


@pytest.fixture
def cli(tmp_path, seeded_template) -> CLI:
    return clone(seeded_template, tmp_path)


@pytest.fixture(scope="module")
def imported_template(tmp_path_factory, seeded_template, hashes) -> Path:
    """The seeded keystore after `keystore import dovecot-passwd users.passwd --domain example.com`."""
    folder = tmp_path_factory.mktemp("legacy-imported")
    cli = clone(seeded_template, folder)
    (folder / "users.passwd").write_text(passwd_text(hashes))
    cli.ok("import", "dovecot-passwd", "users.passwd", "--domain", "example.com")
    return folder


@pytest.fixture
def imported(tmp_path, imported_template) -> CLI:
    cli = clone(imported_template, tmp_path)
    (tmp_path / "users.passwd").write_text((imported_template / "users.passwd").read_text())
    return cli


def legacy_ids(cli: CLI) -> dict[str, str]:
    return {k["mailbox"]: k["id"] for k in cli.json("legacy", "list", "--all")}


# ------------------------------------------------------------------ import


def test_dovecot_passwd_file_is_imported_and_marked_legacy_everywhere(cli, hashes):
    (cli.folder / "users.passwd").write_text(passwd_text(hashes))
    result = cli.run("import", "dovecot-passwd", "users.passwd", "--domain", "example.com")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        SUMMARY_FOUR,
        "Users log in with their mailbox address and their old password; "
        "`keystore legacy list` shows who still does.",
    ]
    no_secret(result, secrets_of(hashes))

    mailboxes = {m["address"]: m for m in cli.json("mailbox", "list")}
    assert {a: m["workspace"] for a, m in mailboxes.items()} == {
        "real@example.com": "example.com", "alice@example.com": "example.com",
        "bob@example.com": "example.com", "carol@example.com": "example.com",
        "dave@other.test": "other.test",
    }
    assert mailboxes["alice@example.com"]["legacy_password"] is True
    assert mailboxes["real@example.com"]["legacy_password"] is False

    listed = table(cli.ok("key", "list"))
    assert sorted(row["SCOPE"] for row in listed) == [
        "mailbox:alice@example.com", "mailbox:bob@example.com", "mailbox:carol@example.com",
        "mailbox:dave@other.test"]
    assert all(row["FLAGS"] == "legacy" for row in listed)
    assert cli.ok("key", "list", "--kind", "key").splitlines()[1:] == []
    assert len(cli.json("key", "list", "--kind", "legacy")) == 4

    rows = table(cli.ok("legacy", "list"))
    assert [(r["MAILBOX"], r["SCHEME"], r["STATE"]) for r in rows] == [
        ("alice@example.com", "SHA512-CRYPT", "active"),
        ("bob@example.com", "BLF-CRYPT", "active"),
        ("carol@example.com", "ARGON2", "active"),
        ("dave@other.test", "SHA256-CRYPT", "active"),
    ]
    alice = next(k for k in cli.json("legacy", "list") if k["mailbox"] == "alice@example.com")
    assert alice["allow_from"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert alice["kind"] == "legacy" and alice["scheme"] == "sha512_crypt"
    shown = cli.ok("key", "show", alice["id"])
    assert "legacy password (SHA512-CRYPT), imported" in shown
    no_secret(shown, secrets_of(hashes))

    # the audit trail: per credential with its mailbox, the new mailboxes, one summary; by ACTOR
    events = cli.json("audit")[1:]  # after the seed's mailbox.add
    no_secret(json.dumps(events), secrets_of(hashes))
    assert {e["actor"] for e in events} == {ACTOR}
    imports = [e for e in events if e["action"] == "legacy.import" and e["mailbox"]]
    assert sorted(e["mailbox"] for e in imports) == [
        "alice@example.com", "bob@example.com", "carol@example.com", "dave@other.test"]
    assert all(e["key_id"] and "from dovecot-passwd:users.passwd line" in e["detail"] for e in imports)
    assert next(e for e in imports if e["mailbox"] == "carol@example.com")["detail"] == (
        "scheme=ARGON2 from dovecot-passwd:users.passwd line 6")
    assert sorted(e["mailbox"] for e in events if e["action"] == "mailbox.add") == [
        "alice@example.com", "bob@example.com", "carol@example.com", "dave@other.test"]
    summary = events[-1]
    assert summary["action"] == "legacy.import" and summary["mailbox"] is None
    assert summary["detail"] == ("source='dovecot-passwd:users.passwd' created=4 updated=0 "
                                 "unchanged=0 retired_not_reimported=0 new_mailboxes=4 bad_lines=0")


async def test_a_workspace_limited_viewer_sees_the_import_entries_of_its_workspace(imported):
    """The per-credential entries carry the mailbox, so they are in its workspace's view;
    the file's summary spans workspaces and is the owners'."""
    store = await KeyStore.open(imported.folder / "keystore.db", imported.folder / "pepper")
    try:
        service = AdminService(store)
        viewer = Actor(name="token:ops", role="viewer", workspaces=frozenset({"other.test"}))
        seen = await service.audit(viewer)
        assert [(e.action, e.mailbox, e.actor) for e in seen] == [
            ("mailbox.add", "dave@other.test", ACTOR), ("legacy.import", "dave@other.test", ACTOR)]
        everything = await service.audit(Actor.shell("root"))
        assert everything[-1].action == "legacy.import" and everything[-1].workspace is None
    finally:
        await store.close()


def test_htpasswd_file_is_imported_into_the_given_workspace(cli):
    lines = [htpasswd_line("erin@example.com", "Erin-pw-5", "-B"),
             htpasswd_line("frank", "Frank-pw-6", "-B")]
    (cli.folder / "web.htpasswd").write_text("\n".join(lines) + "\n")
    out = cli.ok("import", "htpasswd", "web.htpasswd", "--domain", "corp.test", "--workspace", "crew")

    assert out.splitlines()[0] == ("imported from web.htpasswd: 2 legacy password(s) created, 0 updated, "
                                   "0 unchanged, 2 new mailbox(es)")
    no_secret(out, ["Erin-pw-5", "Frank-pw-6", *(line.partition(":")[2] for line in lines)])
    assert {m["address"]: m["workspace"] for m in cli.json("mailbox", "list", "--workspace", "crew")} == {
        "erin@example.com": "crew", "frank@corp.test": "crew"}
    rows = table(cli.ok("legacy", "list", "--workspace", "crew"))
    assert [(r["MAILBOX"], r["SCHEME"], r["STATE"]) for r in rows] == [
        ("erin@example.com", "BLF-CRYPT", "active"), ("frank@corp.test", "BLF-CRYPT", "active")]


# Each bad line: (format, the line (GOOD/OTHER: a good hash), what stderr says of it, secrets).
BAD_LINES = {
    "plain": ("dovecot-passwd", "p@example.com:{PLAIN}Plain-Secret-1",
              "plain-text password ({PLAIN})", ["Plain-Secret-1"]),
    "plain-no-prefix": ("dovecot-passwd", "p@example.com:Plain-Secret-2",
                        "unknown scheme (plain text", ["Plain-Secret-2"]),
    "plain-md5": ("dovecot-passwd", "p@example.com:{plain-md5}", "weak scheme {PLAIN-MD5}", []),
    "des-crypt": ("htpasswd", "p@example.com:{des-crypt}", "weak scheme DES crypt", []),
    "md5-crypt": ("dovecot-passwd", "p@example.com:{md5-crypt}", "weak scheme MD5-CRYPT", []),
    "apr1": ("htpasswd", "p@example.com:{apr1}", "weak scheme Apache MD5 ($apr1$)", []),
    "ssha512": ("dovecot-passwd", "p@example.com:{ssha512}", "weak scheme {SSHA512}", []),
    "unknown": ("dovecot-passwd", "p@example.com:{WHIRLPOOL}abcdef0123", "unknown scheme {WHIRLPOOL}",
                ["abcdef0123"]),
    "empty": ("dovecot-passwd", "p@example.com:", "no password hash", []),
    "no-domain": ("dovecot-passwd", "paul:{other}",
                  "(paul): not a mailbox address; give --domain", []),
    "duplicate": ("dovecot-passwd", "good@example.com:{other}",
                  "(good@example.com): good@example.com is also on line 1", []),
    "alias": ("dovecot-passwd", "sales@example.com:{other}",
              "(sales@example.com): an alias of another mailbox here", []),
    "garbage": ("dovecot-passwd", "{other}", "not 'user:password...'", []),
    "nologin": ("dovecot-passwd", "p@example.com:{other}::::::nologin reason=moved",
                "a 'nologin' or 'nopassword' user", []),
    "malformed-argon2": ("dovecot-passwd",
                         "p@example.com:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$Yv*RuwBCKsNq/XIDEB6gHw"
                         "$t14WWliD4MFs7D8foXiHgf0Fwld12vB+BVWmvpCnnwA",
                         "malformed ARGON2 hash", ["t14WWliD4MFs7D8foXiHgf0Fwld12vB"]),
}


def bad_file(weak: dict[str, str], kind: str) -> tuple[str, str, str, list[str]]:
    """(format, file text, expected reason, secrets): a good line 1, a comment, the bad line
    3, another good line 4."""
    fmt, line, why, secrets = BAD_LINES[kind]
    for name, value in weak.items():
        line = line.replace("{" + name + "}", value)
    good, other = weak["good"], weak["other"]
    if fmt == "htpasswd":
        good, other = good.removeprefix("{SHA512-CRYPT}"), other.removeprefix("{SHA512-CRYPT}")
    text = f"good@example.com:{good}\n# a comment\n{line}\nsecond@example.com:{other}\n"
    hidden = [*secrets, *(v for k, v in weak.items() if "{" + k + "}" in BAD_LINES[kind][1]),
              good, other, "Good-pw-0", "Other-pw-9"]
    return fmt, text, why, [h for h in hidden if h]


def keystore_rows(cli: CLI) -> dict[str, list[tuple]]:
    """Every row of the tables an import writes, read straight from the sqlite file (one
    CLI process per listing would cost a second each, for 15 cases)."""
    with closing(sqlite3.connect(cli.folder / "keystore.db")) as db:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("workspace", "mailbox", "alias", "auth_key", "audit")}


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_one_bad_line_imports_nothing_and_names_the_line(cli, weak, kind):
    fmt, text, why, secrets = bad_file(weak, kind)
    (cli.folder / "users.txt").write_text(text)
    before = keystore_rows(cli)

    result = cli.run("import", fmt, "users.txt")

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == (f"keystore: 1 bad line(s) in {fmt}:users.txt; nothing imported (fix them, "
                        "or pass --skip-bad to import the others):")
    assert len(lines) == 2 and lines[1].startswith("  line 3") and why in lines[1], lines
    no_secret(result, secrets)
    assert keystore_rows(cli) == before  # no mailbox, no credential, no audit entry


def test_a_refused_import_leaves_every_listing_as_it_was(cli, weak):
    """What an admin would look at after a refused import (the alias: found by the store,
    after the good line 1 was written in the same transaction)."""
    fmt, text, _, _ = bad_file(weak, "alias")
    (cli.folder / "users.txt").write_text(text)
    audit_before = cli.json("audit")
    assert cli.run("import", fmt, "users.txt").returncode == 1
    assert [m["address"] for m in cli.json("mailbox", "list")] == ["real@example.com"]
    assert cli.json("key", "list") == []
    assert cli.json("audit") == audit_before


def test_skip_bad_imports_the_good_lines_and_reports_the_others_in_line_order(cli, weak):
    """The alias is found by the store, after the file's own problems: still reported in
    the file's order."""
    text = "\n".join([
        f"one@example.com:{weak['good']}",
        f"sales@example.com:{weak['good']}",  # an alias
        "p@example.com:{PLAIN}Plain-Secret-1",
        f"two@example.com:{weak['other']}",
        "garbage without a colon",
        "",
    ])
    (cli.folder / "users.txt").write_text(text)
    result = cli.run("import", "dovecot-passwd", "users.txt", "--skip-bad")

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "keystore: skipped line 2 (sales@example.com): an alias of another mailbox here: import the "
        "mailbox's own address",
        "keystore: skipped line 3 (p@example.com): plain-text password ({PLAIN}): not imported; hash it "
        "first (doveadm pw -s SHA512-CRYPT) or give the user an auth key",
        "keystore: skipped line 5: not 'user:password...'",
    ]
    assert result.stdout.splitlines()[0] == (
        "imported from users.txt: 2 legacy password(s) created, 0 updated, 0 unchanged, "
        "2 new mailbox(es), 3 line(s) skipped")
    no_secret(result, ["Plain-Secret-1", weak["good"], weak["other"]])
    assert sorted(k["mailbox"] for k in cli.json("legacy", "list")) == ["one@example.com", "two@example.com"]
    assert cli.json("audit")[-1]["detail"].endswith("new_mailboxes=2 bad_lines=3")


def test_a_conflict_lists_the_bad_lines_in_the_files_order(cli, weak):
    text = f"sales@example.com:{weak['good']}\nnodomain:{weak['other']}\n"
    (cli.folder / "users.txt").write_text(text)
    result = cli.run("import", "dovecot-passwd", "users.txt")
    assert result.returncode == 1
    assert [line.split(" (")[0] for line in result.stderr.splitlines()[1:]] == ["  line 1", "  line 2"]


def test_line_numbers_count_only_line_feeds(cli, weak):
    """A gecos field holding a Unicode line separator (or a form feed) is not a line break
    to sed or an editor: the bad line's number is the one they show."""
    text = (f"one@example.com:{weak['good']}:::Ann\u2028Smith\x0c::\n"
            f"two@example.com:{weak['other']}:::Bob\x0bBrown::\n"
            "p@example.com:{PLAIN}Plain-Secret-1\n")
    (cli.folder / "users.txt").write_text(text)
    result = cli.run("import", "dovecot-passwd", "users.txt")
    assert result.returncode == 1
    assert result.stderr.splitlines()[1].startswith("  line 3 (p@example.com): plain-text password")


def test_hashes_too_costly_to_check_are_refused_with_the_reason(cli, hashes):
    """Made with libpass, or Dovecot's with its costs raised (computing them would take
    seconds to a minute: only their settings matter). ARGON2 at 1 GiB and 64 passes is within
    each bound alone, yet costs about a minute a login (64 MiB x 3 passes: 0.2 s)."""
    slow_sha = sha512_crypt(rounds=2_000_000, salt="abcdefgh", checksum="x" * 86).to_string()
    slow_bcrypt = bcrypt(rounds=16, salt="fU.dsqxpC8ybbF88sXoHrO", ident="2y",
                         checksum="sujVRhsNi.dwS61vgptRjXYFVCcQryq").to_string()
    argon = hashes["carol"]
    assert "$m=65536,t=3," in argon
    slow_argon = argon.replace("$m=65536,t=3,", "$m=1048576,t=64,")
    heavy_argon = argon.replace("$m=65536,t=3,", "$m=4194304,t=1,")
    fine_argon = argon.replace("$m=65536,t=3,", "$m=1048576,t=2,")
    (cli.folder / "users.txt").write_text(f"sha@example.com:{{SHA512-CRYPT}}{slow_sha}\n"
                                          f"blf@example.com:{{BLF-CRYPT}}{slow_bcrypt}\n"
                                          f"arg@example.com:{slow_argon}\n"
                                          f"mem@example.com:{heavy_argon}\n"
                                          f"ok@example.com:{fine_argon}\n")
    result = cli.run("import", "dovecot-passwd", "users.txt")
    assert result.returncode == 1
    assert result.stderr.splitlines()[1:] == [
        "  line 1 (sha@example.com): SHA512-CRYPT rounds=2000000 is more than 1000000: one login "
        "would take seconds",
        "  line 2 (blf@example.com): BLF-CRYPT cost 16 is more than 15: one login would take seconds",
        "  line 3 (arg@example.com): ARGON2 m=1048576,t=64 is more than m x t = 2097152 (KiB passes): "
        "one login would take seconds",
        "  line 4 (mem@example.com): ARGON2 m=4194304,t=1 is more than m=1048576,t=64: one login would "
        "take seconds and that memory",
    ]
    no_secret(result, [slow_sha, slow_bcrypt, argon.rpartition("$")[2]])
    assert cli.json("key", "list") == []


def test_dry_run_reports_and_changes_nothing(cli, hashes):
    (cli.folder / "users.passwd").write_text(passwd_text(hashes))
    audit_before = cli.json("audit")
    result = cli.run("import", "dovecot-passwd", "users.passwd", "--domain", "example.com", "--dry-run")

    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [SUMMARY_FOUR.replace("imported from", "would import from"),
                                          "dry run: nothing was changed"]
    assert [m["address"] for m in cli.json("mailbox", "list")] == ["real@example.com"]
    assert cli.json("key", "list") == []
    assert cli.json("audit") == audit_before
    assert cli.json("import", "dovecot-passwd", "users.passwd", "--domain", "example.com",
                    "--dry-run")["created"] == [
        "alice@example.com", "bob@example.com", "carol@example.com", "dave@other.test"]
    assert cli.json("audit") == audit_before


def test_a_domain_too_long_for_a_workspace_name_is_a_bad_line(cli, weak):
    """A workspace is named after the domain unless --workspace is given; a domain that
    cannot name one (77 characters here; names stop at 64) is that line's problem, which
    --skip-bad skips and --workspace solves, not an import that fails as a whole."""
    domain = "mail.department-of-applied-long-names.university-of-somewhere-far.example.edu"
    (cli.folder / "users.txt").write_text(f"ok@fine.test:{weak['good']}\nann@{domain}:{weak['other']}\n")
    result = cli.run("import", "dovecot-passwd", "users.txt")
    assert result.returncode == 1
    assert result.stderr.splitlines()[1] == (
        f"  line 2 (ann@{domain}): its domain cannot name a workspace (at most 64 letters, digits, "
        "'.', '_' and '-'); give --workspace")
    assert [m["address"] for m in cli.json("mailbox", "list")] == ["real@example.com"]

    result = cli.run("import", "dovecot-passwd", "users.txt", "--skip-bad")
    assert result.returncode == 0 and "1 legacy password(s) created" in result.stdout
    assert result.stderr.startswith("keystore: skipped line 2 ")
    out = cli.ok("import", "dovecot-passwd", "users.txt", "--workspace", "university")
    assert out.startswith("imported from users.txt: 1 legacy password(s) created, 0 updated, 1 unchanged")
    workspaces = {m["address"]: m["workspace"] for m in cli.json("mailbox", "list")}
    assert workspaces[f"ann@{domain}"] == "university"


def test_a_byte_order_mark_and_invisible_characters_make_no_mailbox(cli, weak):
    """A file saved by a Windows editor starts with a byte order mark: the first user is
    still one@example.com, not an address with an invisible character nobody can type. A
    user holding one (a zero-width space), a terminal control (C1 CSI) or bytes that are not
    UTF-8 (a Latin-1 file) is a bad line, not a mailbox and not a failed import."""
    good, other = weak["good"].encode(), weak["other"].encode()
    data = ("\ufeff".encode() + b"one@example.com:" + good + b"\n"
            + "tw\u200bo@example.com:".encode() + other + b"\n"
            + b"jos\xe9@example.com:" + other + b"\n"
            + "a\x9b31m@example.com:".encode() + other + b"\n"
            + "jos\u00e9@example.com:".encode() + other + b"\n")
    (cli.folder / "users.txt").write_bytes(data)
    result = cli.run("import", "dovecot-passwd", "users.txt", "--skip-bad")
    assert result.returncode == 0, result.stderr
    why = ("not a valid mailbox address: it holds an invisible or control character, or bytes "
           "that are not UTF-8")
    assert result.stderr.splitlines() == [f"keystore: skipped line 2 (tw?o@example.com): {why}",
                                          f"keystore: skipped line 3 (jos?@example.com): {why}",
                                          f"keystore: skipped line 4 (a?31m@example.com): {why}"]
    assert [m["address"] for m in cli.json("mailbox", "list")] == [
        "jos\u00e9@example.com", "one@example.com", "real@example.com"]


def test_a_file_name_that_is_not_utf8_is_shown_and_recorded_escaped(cli):
    """A file name is bytes: one from a Latin-1 system (caf\\xe9.txt) cannot be stored as it
    is, so the report and the audit trail name it with the byte escaped."""
    name = os.fsdecode(b"caf\xe9.txt")
    (cli.folder / name).write_text(htpasswd_line("pat@example.com", "Pat-pw-8", "-B") + "\n")
    out = cli.ok("import", "htpasswd", name)
    assert out.splitlines()[0].startswith("imported from caf\\xe9.txt: 1 legacy password(s) created")
    assert cli.json("audit")[-1]["detail"].startswith("source='htpasswd:caf\\\\xe9.txt' created=1")


# --------------------------------------------------------------- re-import


async def test_reimport_keeps_updates_and_never_gives_a_retired_password_back(imported, hashes):
    again = ["import", "dovecot-passwd", "users.passwd", "--domain", "example.com"]
    out = imported.ok(*again)
    assert out.splitlines()[0] == ("imported from users.passwd: 0 legacy password(s) created, 0 updated, "
                                   "4 unchanged, 0 new mailbox(es)")

    # bob changed his password on the old server
    new_bob = doveadm_pw("BLF-CRYPT", "Bob-new-pw-7")
    path = imported.folder / "users.passwd"
    path.write_text(path.read_text().replace(hashes["bob@example.com"], new_bob))
    out = imported.ok(*again)
    assert out.splitlines()[0] == ("imported from users.passwd: 0 legacy password(s) created, 1 updated, "
                                   "3 unchanged, 0 new mailbox(es)")
    ids = legacy_ids(imported)
    update = imported.json("audit", "--mailbox", "bob@example.com")[-1]
    assert (update["action"], update["actor"], update["key_id"]) == ("legacy.update", ACTOR,
                                                                     ids["bob@example.com"])
    assert update["detail"] == "password from dovecot-passwd:users.passwd line 4"
    no_secret(json.dumps(update), [new_bob, "Bob-new-pw-7"])

    # bob is converted and his key used (the password is retired); alice's is revoked
    converted = imported.json("legacy", "convert", "bob@example.com")
    assert isinstance(await imported.login("bob@example.com", converted["secret"]), Identity)
    assert imported.json("key", "show", ids["bob@example.com"])["status"] == "revoked"
    imported.ok("key", "revoke", ids["alice@example.com"])

    out = imported.ok(*again)
    assert out.splitlines()[:2] == [
        "imported from users.passwd: 0 legacy password(s) created, 0 updated, 2 unchanged, "
        "0 new mailbox(es)",
        "not given back (retired here already): alice@example.com, bob@example.com",
    ]
    states = {r["MAILBOX"]: r["STATE"] for r in table(imported.ok("legacy", "list", "--all"))}
    assert states == {"alice@example.com": "retired", "bob@example.com": "retired",
                      "carol@example.com": "active", "dave@other.test": "active"}
    assert "bob@example.com" not in imported.ok("legacy", "list")
    retire = [e for e in imported.json("audit", "--mailbox", "bob@example.com")
              if e["action"] == "legacy.retire"]
    assert len(retire) == 1 and retire[0]["actor"] == "relay"
    assert await imported.login("bob@example.com", "Bob-new-pw-7") == Reason.PASSWORD_RETIRED


# ------------------------------------------------------------ legacy commands


def test_expire_sets_a_deadline_in_scope_and_refuses_a_past_one(imported):
    ids = legacy_ids(imported)
    before = time.time()
    out = imported.ok("legacy", "expire", "--after", "30d", "--mailbox", "bob@example.com")
    deadline = out.split(" stop working at ")[1].split(";")[0]
    assert out == (f"1 legacy password(s) stop working at {deadline}; after that, their users are "
                   "told to use an auth key\n")
    assert before + 30 * 86400 - 1 <= when(deadline) <= time.time() + 30 * 86400

    out = imported.ok("legacy", "expire", "--at", "2099-01-01", "--workspace", "example.com")
    assert out.startswith("3 legacy password(s) stop working at 2099-01-01T00:00:00Z;")
    rows = {r["MAILBOX"]: r for r in table(imported.ok("legacy", "list"))}
    assert {m: r["DEADLINE"] for m, r in rows.items()} == {
        "alice@example.com": "2099-01-01T00:00:00Z", "bob@example.com": "2099-01-01T00:00:00Z",
        "carol@example.com": "2099-01-01T00:00:00Z", "dave@other.test": "-"}
    expired = [e for e in imported.json("audit") if e["action"] == "legacy.expire"]
    assert [(e["key_id"], e["actor"], e["detail"]) for e in expired] == [
        (ids["bob@example.com"], ACTOR, f"deadline={deadline}"),
        (ids["alice@example.com"], ACTOR, "deadline=2099-01-01T00:00:00Z"),
        (ids["bob@example.com"], ACTOR, "deadline=2099-01-01T00:00:00Z"),
        (ids["carol@example.com"], ACTOR, "deadline=2099-01-01T00:00:00Z"),
    ]

    line = imported.refused("legacy", "expire", "--at", "2020-01-01")
    assert line == ("keystore: the deadline 2020-01-01T00:00:00Z is in the past; give a later --at, "
                    "or --after DURATION")
    line = imported.refused("legacy", "expire", "--after", "1d", "--workspace", "nowhere")
    assert line == "keystore: unknown workspace: nowhere"
    assert imported.usage("legacy", "expire", "--after", "1d", "--at", "2099-01-01")
    assert len([e for e in imported.json("audit") if e["action"] == "legacy.expire"]) == 4


def test_convert_prints_the_key_once_and_refuses_what_it_cannot_do(imported):
    ids = legacy_ids(imported)
    out = imported.ok("legacy", "convert", "carol@example.com", "--name", "Thunderbird")
    secret = next(line.strip() for line in out.splitlines() if line.strip().startswith("rak_"))
    assert out.count(secret) == 1
    assert out.splitlines()[0].startswith("created key ") and "mailbox:carol@example.com" in out
    assert f"The legacy password ({ids['carol@example.com']}) keeps working until this key is first " \
           "used; then it is retired." in out
    key_id = out.split()[2]
    assert secret not in imported.ok("key", "list") + imported.ok("key", "show", key_id)
    row = next(r for r in table(imported.ok("legacy", "list")) if r["MAILBOX"] == "carol@example.com")
    assert (row["STATE"], row["NEW KEY"]) == ("active", key_id)

    line = imported.refused("legacy", "convert", "carol@example.com")
    assert line == (f"keystore: mailbox carol@example.com already has key {key_id} to replace its password "
                    "(retired at that key's first use); revoke that key to convert again")
    assert imported.refused("legacy", "convert", "real@example.com") == (
        "keystore: mailbox real@example.com has no legacy password to convert")
    assert imported.refused("legacy", "convert", "nobody@example.com") == (
        "keystore: unknown mailbox: nobody@example.com")
    assert imported.refused("key", "rotate", ids["bob@example.com"]) == (
        f"keystore: {ids['bob@example.com']} is a legacy password: it is not rotated; give its mailbox "
        "a key instead (keystore legacy convert bob@example.com)")

    imported.ok("key", "revoke", key_id)  # the key was never used: the password stays, convert again
    assert imported.json("key", "show", ids["carol@example.com"])["status"] == "active"
    again = imported.json("legacy", "convert", "carol@example.com")
    assert again["id"] != key_id and again["secret"].startswith("rak_")
    trail = [(e["action"], e["actor"], e["key_id"])
             for e in imported.json("audit", "--mailbox", "carol@example.com")
             if e["action"] in ("key.create", "legacy.convert")]
    assert trail == [("key.create", ACTOR, key_id), ("legacy.convert", ACTOR, ids["carol@example.com"]),
                     ("key.create", ACTOR, again["id"]), ("legacy.convert", ACTOR, ids["carol@example.com"])]
    no_secret(json.dumps(imported.json("audit")), [secret, again["secret"]])


async def test_legacy_list_shows_the_last_use_and_client(imported):
    """A login with the password (as the relay makes one) is what `legacy list` shows, so an
    operator sees who still uses it."""
    assert isinstance(await imported.login("carol@example.com", "Carol-old-pw-3"), Identity)
    rows = {r["MAILBOX"]: r for r in table(imported.ok("legacy", "list"))}
    assert rows["carol@example.com"]["LAST CLIENT"] == "198.51.100.7"
    assert abs(when(rows["carol@example.com"]["LAST USED"]) - time.time()) < 120
    assert (rows["bob@example.com"]["LAST USED"], rows["bob@example.com"]["LAST CLIENT"]) == ("-", "-")


def test_legacy_passwords_do_not_count_toward_the_key_limit(imported):
    imported.ok("workspace", "set-limit", "example.com", "1")
    imported.create_key("--mailbox", "alice@example.com", "--name", "Mail app")
    line = imported.refused("key", "create", "--mailbox", "bob@example.com", "--name", "Other app")
    assert "already has 1 active keys (limit 1)" in line
    row = next(w for w in imported.json("workspace", "list") if w["name"] == "example.com")
    assert row["active_keys"] == 1
    # a conversion makes a key: it is refused at the limit, like any other
    assert "already has 1 active keys (limit 1)" in imported.refused("legacy", "convert", "bob@example.com")


# ------------------------------------------------------------- the store itself


def entry(line: int, address: str, password_hash: str, scheme: str = "sha512_crypt") -> LegacyEntry:
    return LegacyEntry(line, address, scheme, password_hash.rpartition("}")[2])


@pytest.fixture
async def store(keystore_place):
    store = await keystore_place.open()
    try:
        await store.add_mailbox("real@example.com", workspace="example.com", aliases=["sales@example.com"],
                                actor="admin")
        yield store
    finally:
        await store.close()


async def test_store_key_limit_counts_keys_not_legacy_passwords(store, weak):
    """A workspace's limit is on the keys its people make; passwords brought in by an import
    are there already and on their way out."""
    await store.import_legacy([entry(n, f"user{n}@example.com", weak["good"]) for n in (1, 2, 3)],
                              source="f", actor="m")
    await store.set_key_limit("example.com", 1, actor="m")
    await store.create_key(mailbox="user1@example.com", name="app", actor="m")
    with pytest.raises(Conflict, match=r"already has 1 active keys \(limit 1\)"):
        await store.create_key(mailbox="user2@example.com", name="app", actor="m")
    (workspace,) = [w for w in await store.list_workspaces() if w.name == "example.com"]
    assert (workspace.active_keys, workspace.mailboxes) == (1, 4)


async def test_store_import_is_one_transaction(store, weak):
    """A line the store refuses (an alias) comes after two lines were written: all undone, the
    new mailboxes and their audit entries too; likewise a dry run and a file's bad line."""
    audit_before = await store.audit_events()
    entries = [entry(1, "one@example.com", weak["good"]), entry(2, "two@new.test", weak["other"]),
               entry(3, "sales@example.com", weak["good"])]
    with pytest.raises(Conflict) as refused:
        await store.import_legacy(entries, source="f", actor="migration")
    assert "line 3 (sales@example.com): an alias of another mailbox here" in str(refused.value)
    assert weak["good"].rpartition("}")[2] not in str(refused.value)
    with pytest.raises(Conflict):
        await store.import_legacy(entries[:2], source="f", actor="migration",
                                  problems=[BadLine(4, "p@example.com", "no password hash")])
    report = await store.import_legacy(entries[:2], source="f", actor="migration", dry_run=True)
    assert report.created == ["one@example.com", "two@new.test"]

    assert [m.address for m in await store.list_mailboxes()] == ["real@example.com"]
    assert [w.name for w in await store.list_workspaces()] == ["example.com"]
    assert await store.list_keys() == []
    assert await store.audit_events() == audit_before

    report = await store.import_legacy(entries, source="f", actor="migration", skip_bad=True)
    assert (report.created, [p.line for p in report.problems]) == (["one@example.com", "two@new.test"], [3])


async def test_one_live_legacy_password_per_mailbox(store, weak):
    """The partial unique index: a second live legacy row for a mailbox is refused by the
    database itself (two imports racing), a retired one is not counted."""
    await store.import_legacy([entry(1, "one@example.com", weak["good"])], source="f", actor="m")
    (first,) = await store.list_keys(kind="legacy")
    (mailbox_id, ws_id), = await store._db.fetch(
        "SELECT mailbox_id, workspace_id FROM auth_key WHERE id = ?", (first.id,))
    insert = ("INSERT INTO auth_key (id, name, workspace_id, mailbox_id, permissions, status, created, "
              "secret_hash, kind, scheme, password_hash) VALUES (?, 'legacy password', ?, ?, "
              "'email.send', 'active', ?, ?, 'legacy', 'sha512_crypt', ?)")
    with pytest.raises(Conflict):
        await store._db.execute(insert, ("second00000a", ws_id, mailbox_id, time.time(), b"x" * 32,
                                         weak["other"]))
    await store.revoke_key(first.id, actor="m")
    await store._db.execute(insert, ("second00000b", ws_id, mailbox_id, time.time(), b"x" * 32,
                                     weak["other"]))
    assert sorted((k.id, k.status) for k in await store.list_keys(kind="legacy")) == sorted(
        [(first.id, "revoked"), ("second00000b", "active")])


async def test_converted_password_is_retired_only_after_the_key_is_used(store, weak):
    await store.import_legacy([entry(1, "one@example.com", weak["good"])], source="f", actor="m")
    legacy, key, secret = await store.convert_legacy("one@example.com", actor="ann")
    assert legacy.replaced_by == key.id and key.kind == "key" and key.mailbox == "one@example.com"

    async def status() -> str:  # as stored: get_key would flush the uses first
        (found,), = await store._db.fetch("SELECT status FROM auth_key WHERE id = ?", (legacy.id,))
        return found

    # the password still logs in, and its own use retires nothing
    still = await store.authenticate("one@example.com", "Good-pw-0", "192.0.2.1")
    assert isinstance(still, Identity) and still.legacy and still.key_id == legacy.id
    await store.flush_uses()
    assert await status() == "active"
    # a wrong key of the mailbox is no use of the key
    wrong = secret[:-1] + ("7" if secret[-1] != "7" else "8")
    assert not isinstance(await store.authenticate("one@example.com", wrong, "192.0.2.1"), Identity)
    await store.flush_uses()
    assert await status() == "active"

    identity = await store.authenticate("one@example.com", secret, "192.0.2.1")
    assert isinstance(identity, Identity) and identity.key_id == key.id
    assert await status() == "active"  # retired at the bookkeeping, not in the login
    await store.flush_uses()
    assert await status() == "revoked"
    retire = [e for e in await store.audit_events(mailbox="one@example.com") if e.action == "legacy.retire"]
    assert len(retire) == 1
    assert (retire[0].actor, retire[0].key_id, retire[0].workspace) == ("relay", legacy.id, "example.com")
    assert f"its replacement key {key.id} was first used" in retire[0].detail
    assert "from 192.0.2.1" in retire[0].detail
    converted = [e for e in await store.audit_events(key_id=legacy.id) if e.action == "legacy.convert"]
    assert converted[0].actor == "ann"

    assert await store.authenticate("one@example.com", "Good-pw-0", "192.0.2.1") == Reason.PASSWORD_RETIRED
    report = await store.import_legacy([entry(1, "one@example.com", weak["other"])], source="f", actor="m")
    assert (report.retired, report.created, report.updated) == (["one@example.com"], [], [])
    with pytest.raises(StoreError, match="no legacy password to convert"):
        await store.convert_legacy("one@example.com", actor="ann")
    await store.flush_uses()  # nothing more to retire: no second entry
    assert len([e for e in await store.audit_events() if e.action == "legacy.retire"]) == 1


async def test_expire_scopes_and_leaves_retired_ones(store, weak):
    await store.import_legacy([entry(1, "one@example.com", weak["good"]),
                               entry(2, "two@example.com", weak["other"]),
                               entry(3, "three@else.test", weak["good"])], source="f", actor="m")
    ids = {k.mailbox: k.id for k in await store.list_keys(kind="legacy")}
    await store.revoke_key(ids["two@example.com"], actor="m")
    soon = time.time() + 3600

    changed = await store.expire_legacy(soon, actor="ann", workspace="example.com")
    assert [k.mailbox for k in changed] == ["one@example.com"]  # two's is retired
    changed = await store.expire_legacy(soon + 60, actor="ann", mailbox="three@else.test")
    assert [(k.mailbox, k.expires) for k in changed] == [("three@else.test", soon + 60)]
    with pytest.raises(StoreError, match="in the past"):
        await store.expire_legacy(time.time() - 1, actor="ann")
    assert [k.mailbox for k in await store.expire_legacy(soon + 120, actor="ann",
                                                          workspaces=["else.test"])] == ["three@else.test"]
    events = [(e.mailbox, e.actor, e.workspace) for e in await store.audit_events()
              if e.action == "legacy.expire"]
    assert events == [("one@example.com", "ann", "example.com"), ("three@else.test", "ann", "else.test"),
                      ("three@else.test", "ann", "else.test")]


def test_the_passwd_reader_keeps_allow_nets_and_never_the_hash_in_a_problem(weak):
    entries, bad = read_dovecot_passwd(
        f"a@x.test:{weak['good']}:::::: allow_nets=2001:db8::/32,192.0.2.7\n"
        f"b@x.test:{weak['good']}:::::: allow_nets=local\n"
        f"c@x.test:{weak['good']}:::::: allow_nets=not-a-net\n")
    assert [(e.address, e.allow_from) for e in entries] == [("a@x.test", ("2001:db8::/32", "192.0.2.7/32"))]
    assert [(b.line, b.why.split(":")[0]) for b in bad] == [(2, "allow_nets=local"), (3, "allow_nets")]
    assert all(weak["good"].rpartition("}")[2] not in str(b) + repr(e) for b in bad for e in entries)


async def test_two_imports_at_once_make_one_password_per_mailbox(keystore_place, store, weak):
    """Two operators (or a retried cron job) import the same file at the same moment: the
    imports take turns, the second finds everything there."""
    other = await keystore_place.open(create=False)
    try:
        entries = [entry(n, f"user{n}@example.com", weak["good"]) for n in range(1, 21)]
        first, second = await asyncio.gather(
            store.import_legacy(entries, source="a", actor="ann"),
            other.import_legacy(entries, source="b", actor="bob"))
    finally:
        await other.close()
    assert sorted([len(first.created), len(second.created)]) == [0, 20]
    assert sorted([len(first.unchanged), len(second.unchanged)]) == [0, 20]
    legacy = await store.list_keys(kind="legacy")
    assert sorted(k.mailbox for k in legacy) == sorted(e.address for e in entries)


async def test_a_password_is_retired_once_when_two_relays_see_its_key_used(keystore_place, store, weak):
    """Each relay retires what is stored (`_retire_converted`): two flushing at once write
    one revocation and one audit entry."""
    await store.import_legacy([entry(1, "one@example.com", weak["good"])], source="f", actor="m")
    legacy, _, secret = await store.convert_legacy("one@example.com", actor="ann")
    other = await keystore_place.open(create=False)
    try:
        for relay in (store, other):
            assert isinstance(await relay.authenticate("one@example.com", secret, "192.0.2.1"), Identity)
        await asyncio.gather(store.flush_uses(), other.flush_uses())
    finally:
        await other.close()
    assert (await store.get_key(legacy.id)).status == "revoked"
    assert [e.action for e in await store.audit_events(key_id=legacy.id)].count("legacy.retire") == 1


async def test_expire_leaves_a_password_already_past_its_deadline(store, weak):
    await store.import_legacy([entry(1, "one@example.com", weak["good"]),
                               entry(2, "two@example.com", weak["other"])], source="f", actor="m")
    ids = {k.mailbox: k.id for k in await store.list_keys(kind="legacy")}
    ended_at = time.time() + 0.5
    await store.expire_legacy(ended_at, actor="ann", mailbox="one@example.com")
    await wait_until(lambda: time.time() > ended_at)

    later = time.time() + 86400
    changed = await store.expire_legacy(later, actor="ann")
    assert [k.mailbox for k in changed] == ["two@example.com"]
    assert (await store.get_key(ids["one@example.com"])).expires == pytest.approx(ended_at)
