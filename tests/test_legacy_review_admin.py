"""Review of issue 13's import and admin side, as a careless admin and a hostile limited
token would use it: an upgrade of a keystore of the previous release with keys in it (both
engines), the key limit and legacy passwords brought back by an admin, a password file
holding what looks like a {SCHEME} but is a plain-text password, and odd files (CRLF,
addresses differing in case across imports).

Hashes come from the real tools (doveadm, htpasswd) where one is checked at a login."""

from __future__ import annotations

import sqlite3
import subprocess
import time

import pytest

from keystore import keys, pg, pgschema
from keystore.legacy import HashRefused, LegacyEntry, classify
from keystore.models import Identity
from keystore.passwdfile import read_dovecot_passwd
from keystore.schema import MIGRATIONS, run_migrations
from keystore.store import Conflict
from tests.test_keystore_cli import CLI

PASSWORD = "Old-Dovecot-pw-7"


def doveadm_pw(scheme: str, password: str) -> str:
    done = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def sha512() -> str:
    """PASSWORD as Dovecot hashes it, `{SHA512-CRYPT}$6$...`."""
    return doveadm_pw("SHA512-CRYPT", PASSWORD)


def entry(line: int, address: str, dovecot_hash: str) -> LegacyEntry:
    scheme, hashed = classify(dovecot_hash, dovecot=True)
    return LegacyEntry(line, address, scheme, hashed)


# ------------------------------------------------- the previous release's keystore


async def _seed_previous_release(place, key_rows: list[tuple]) -> None:
    """A keystore at the schema before issue 13 (sqlite 4, PostgreSQL 2) holding a workspace,
    a mailbox and keys as that release wrote them."""
    # no explicit row ids: PostgreSQL's identity columns must go on from where these end
    workspace = "INSERT INTO workspace (name, key_limit, created) VALUES ('acme', 2, 0)"
    mailbox = ("INSERT INTO mailbox (address, workspace_id, created) "
               "SELECT 'alice@acme.test', id, 0 FROM workspace WHERE name = 'acme'")
    key = ("INSERT INTO auth_key (id, name, workspace_id, mailbox_id, permissions, status, created, "
           "secret_hash) VALUES (?, ?, (SELECT id FROM workspace WHERE name = 'acme'), "
           "(SELECT id FROM mailbox WHERE address = ?), 'email.send', ?, 0, ?)")
    if place.url is None:
        db = sqlite3.connect(place.folder / "keystore.db")
        try:
            run_migrations(db, MIGRATIONS[:4], what="keystore")
            db.execute(workspace)
            db.execute(mailbox)
            db.executemany(key, key_rows)
            db.commit()
        finally:
            db.close()
        return
    pool = await pg.open_pool(place.url, name="previous release")
    try:
        await pg.migrate(pool, pgschema.COMPONENT, pgschema.MIGRATIONS[:2])
        async with pool.connection() as conn:
            await conn.execute(workspace)
            await conn.execute(mailbox)
            for row in key_rows:
                await conn.execute(pg.to_pg(key), row)
    finally:
        await pool.close()


async def test_an_upgraded_keystore_keeps_its_keys_and_counts_and_takes_legacy_passwords(
        keystore_place, sha512):
    """The migration adds `kind` to every existing row: the keys made before it still log
    in, they are keys (not legacy) in every listing and count, and a legacy password then
    imported does not count toward the workspace's limit (2, both taken)."""
    keys.create_pepper(keystore_place.pepper_file)
    pepper = keys.load_pepper(keystore_place.pepper_file)
    made, rows = {}, []
    for key_id, name, mailbox, status in (("aaaaaaaaaaaa", "CRM", "alice@acme.test", "active"),
                                          ("bbbbbbbbbbbb", "Shared", None, "active"),
                                          ("cccccccccccc", "Old", "alice@acme.test", "disabled")):
        made[key_id], secret = keys.generate_key(key_id)
        rows.append((key_id, name, mailbox, status, keys.hash_secret(pepper, key_id, secret)))
    await _seed_previous_release(keystore_place, rows)

    store = await keystore_place.open(create=False)  # migrates to the newest schema
    try:
        for key_id in ("aaaaaaaaaaaa", "bbbbbbbbbbbb"):
            identity = await store.authenticate("alice@acme.test", made[key_id], "192.0.2.1")
            assert isinstance(identity, Identity) and identity.key_id == key_id and not identity.legacy
        assert not isinstance(await store.authenticate("alice@acme.test", made["cccccccccccc"],
                                                       "192.0.2.1"), Identity)
        assert {k.id: k.kind for k in await store.list_keys()} == {
            "aaaaaaaaaaaa": "key", "bbbbbbbbbbbb": "key", "cccccccccccc": "key"}
        assert await store.list_keys(kind="legacy") == []
        (box,) = await store.list_mailboxes()
        assert (box.keys, box.workspace_keys, box.legacy_password) == (2, 1, False)
        (ws,) = await store.list_workspaces()
        assert ws.active_keys == 2

        report = await store.import_legacy([entry(1, "Alice@ACME.test", sha512),
                                            entry(2, "bob@acme.test", sha512)],
                                           source="users.passwd", actor="root", workspace="acme")
        assert (report.created, report.mailboxes_created) == (
            ["alice@acme.test", "bob@acme.test"], ["bob@acme.test"])
        legacy = await store.authenticate("alice@acme.test", PASSWORD, "192.0.2.1")
        assert isinstance(legacy, Identity) and legacy.legacy
        assert isinstance(await store.authenticate("alice@acme.test", made["aaaaaaaaaaaa"], "192.0.2.1"),
                          Identity)
        (ws,) = await store.list_workspaces()
        assert ws.active_keys == 2  # the passwords are not keys
        boxes = {m.address: m for m in await store.list_mailboxes()}
        assert (boxes["alice@acme.test"].keys, boxes["alice@acme.test"].legacy_password) == (2, True)
        assert (boxes["bob@acme.test"].keys, boxes["bob@acme.test"].legacy_password) == (0, True)
    finally:
        await store.close()


# ------------------------------------------- the key limit and legacy passwords


async def test_a_legacy_password_is_brought_back_whatever_the_key_limit(keystore_place, sha512):
    """Legacy passwords do not count toward a workspace's key limit, so enabling a disabled
    one, or giving an ended one a later deadline (`key update ID --expires`, as `legacy
    expire` tells), is not refused because the workspace's keys are at their limit: it used
    to say "already has 1 active keys (limit 1)" of a password that is no key."""
    store = await keystore_place.open()
    try:
        await store.add_mailbox("alice@acme.test", workspace="acme", actor="root")
        await store.import_legacy([entry(1, "alice@acme.test", sha512), entry(2, "bob@acme.test", sha512)],
                                  source="f", actor="root", workspace="acme")
        ids = {k.mailbox: k.id for k in await store.list_keys(kind="legacy")}
        await store.set_key_limit("acme", 1, actor="root")
        await store.create_key(mailbox="alice@acme.test", name="app", actor="root")

        await store.disable_key(ids["alice@acme.test"], actor="root")
        enabled = await store.enable_key(ids["alice@acme.test"], actor="root")
        assert enabled.status == "active"

        ended = time.time() + 0.2
        await store.expire_legacy(ended, actor="root", mailbox="bob@acme.test")
        while time.time() <= ended:  # the deadline passes (a store-level wait: no relay here)
            await store.flush_uses()
        later = time.time() + 86400
        back = await store.update_key(ids["bob@acme.test"], {"expires": later}, actor="root")
        assert back.expires == pytest.approx(later)
        assert isinstance(await store.authenticate("bob@acme.test", PASSWORD, "192.0.2.1"), Identity)

        # the limit still holds for keys
        with pytest.raises(Conflict, match=r"already has 1 active keys \(limit 1\)"):
            await store.create_key(mailbox="bob@acme.test", name="app", actor="root")
    finally:
        await store.close()


# ------------------------------------------------ what an error may show of a line


@pytest.mark.parametrize("password", ["{Summer2024}", "{hunter2}rest-of-it", "{Tr0ub4dor-3}"])
def test_a_plain_text_password_that_looks_like_a_scheme_is_never_shown(password):
    """A passwd-file line `user:{Summer2024}` holds a plain-text password whose braces make
    it look like a {SCHEME} prefix: the refusal used to name it ("unknown scheme
    {SUMMER2024}"), writing the password (upper-cased) to the terminal and any log of the
    import. Only a scheme Dovecot knows is named."""
    with pytest.raises(HashRefused) as refused:
        classify(password, dovecot=True)
    shown = str(refused.value)
    inner = password[1:password.index("}")]
    assert inner.upper() not in shown.upper(), shown
    assert "unknown {SCHEME} prefix" in shown
    entries, bad = read_dovecot_passwd(f"alice@acme.test:{password}\n")
    assert entries == [] and inner.upper() not in str(bad[0]).upper()


@pytest.mark.parametrize(("prefix", "words"), [
    ("{SCRAM-SHA-256}", "unknown scheme {SCRAM-SHA-256}"),
    ("{PBKDF2}", "unknown scheme {PBKDF2}"),
    ("{sha512-crypt.hex}", "unknown scheme {SHA512-CRYPT.HEX}"),
])
def test_a_scheme_dovecot_knows_is_still_named(prefix, words):
    with pytest.raises(HashRefused, match=words.replace("{", r"\{").replace("}", r"\}")):
        classify(prefix + "c29tZXRoaW5n", dovecot=True)


# -------------------------------------------------------------- odd files


def test_a_crlf_file_with_addresses_differing_in_case_imports_one_mailbox_each(tmp_path, sha512):
    """A file saved on Windows (BOM, CRLF), whose users are written in another case than the
    keystore's mailboxes, and a second file naming the same users in yet another case: one
    mailbox and one password each, the second import finds them unchanged."""
    cli = CLI(tmp_path)
    cli.ok("init")
    cli.ok("mailbox", "add", "alice@acme.test", "--workspace", "acme")
    text = ("\ufeff# moved from mail1\r\n"
            f"ALICE@Acme.Test:{sha512}::::::\r\n"
            f"bob@ACME.test:{sha512}::::::  allow_nets=192.0.2.0/24 \r\n"
            "\r\n")
    (tmp_path / "one.passwd").write_bytes(text.encode())
    out = cli.ok("import", "dovecot-passwd", "one.passwd")
    assert out.splitlines()[0] == ("imported from one.passwd: 2 legacy password(s) created, 0 updated, "
                                   "0 unchanged, 1 new mailbox(es)")
    (tmp_path / "two.passwd").write_bytes(text.replace("ALICE@Acme.Test", "alice@acme.TEST")
                                          .replace("bob@ACME.test", "Bob@Acme.Test").encode())
    out = cli.ok("import", "dovecot-passwd", "two.passwd")
    assert out.splitlines()[0] == ("imported from two.passwd: 0 legacy password(s) created, 0 updated, "
                                   "2 unchanged, 0 new mailbox(es)")
    listed = cli.json("legacy", "list")
    assert sorted((k["mailbox"], k["allow_from"]) for k in listed) == [
        ("alice@acme.test", []), ("bob@acme.test", ["192.0.2.0/24"])]
    assert [m["address"] for m in cli.json("mailbox", "list")] == ["alice@acme.test", "bob@acme.test"]


async def test_the_store_imports_an_address_in_its_canonical_form(keystore_place, sha512):
    """`import_legacy` is the store's door (the service, the CLI); an entry it is given in
    another case than the mailbox's found that mailbox missing and made a second one,
    'Alice@Example.COM', that no login (always lower case) could reach."""
    store = await keystore_place.open()
    try:
        await store.add_mailbox("alice@example.com", workspace="example.com", actor="root")
        report = await store.import_legacy([entry(1, "Alice@Example.COM", sha512),
                                            entry(2, "not an address", sha512)],
                                           source="f", actor="root", skip_bad=True)
        assert (report.created, report.mailboxes_created) == (["alice@example.com"], [])
        assert [str(p) for p in report.problems] == ["line 2: not a valid mailbox address"]
        assert [m.address for m in await store.list_mailboxes()] == ["alice@example.com"]
        identity = await store.authenticate("alice@example.com", PASSWORD, "192.0.2.1")
        assert isinstance(identity, Identity) and identity.legacy
    finally:
        await store.close()


@pytest.fixture(scope="module")
def real_hashes(sha512) -> dict[str, str]:
    """PASSWORD in each accepted scheme, by the real tools (htpasswd's bcrypt: no prefix)."""
    done = subprocess.run(["htpasswd", "-nbB", "u", PASSWORD], capture_output=True, text=True,
                          check=True, timeout=30)
    return {"SHA512-CRYPT": sha512, "SHA256-CRYPT": doveadm_pw("SHA256-CRYPT", PASSWORD),
            "ARGON2ID": doveadm_pw("ARGON2ID", PASSWORD), "htpasswd": done.stdout.strip().partition(":")[2]}


def test_a_line_cut_short_after_the_salt_is_a_bad_line(real_hashes):
    """A file cut at a column width, or a hash pasted without its end: "$6$salt$" is what
    libpass calls a configuration string. It was imported ("1 created"), could never match,
    and logged "could not be checked" at each of its user's logins; it is a bad line now."""
    lines, numbers = [], []
    for number, (name, whole) in enumerate(real_hashes.items(), start=1):
        # up to the end of the salt (bcrypt's 22 characters of salt run on into its hash)
        cut = whole[:29] if name == "htpasswd" else whole[:whole.rindex("$")]
        lines.append(f"user{number}@acme.test:{cut}")
        shown = {"htpasswd": "BLF-CRYPT", "ARGON2ID": "ARGON2"}.get(name, name)
        numbers.append((number, f"malformed {shown} hash: a salt without the hash itself "
                                "(the line is cut short?)"))
    entries, bad = read_dovecot_passwd("\n".join(lines) + "\n")
    assert entries == []
    assert [(b.line, b.why) for b in bad] == numbers
    whole_entries, whole_bad = read_dovecot_passwd(
        "".join(f"user{n}@acme.test:{h}\n" for n, h in enumerate(real_hashes.values(), start=1)))
    assert (len(whole_entries), whole_bad) == (4, [])


def test_a_huge_line_is_refused_at_once_and_never_stored(sha512):
    """Two lines run together (a missing line feed) or garbage: a "hash" of megabytes would be
    read and sent to a check process at every login. Refused, quickly, naming no part of it."""
    junk = "$6$" + "Q" * 5_000_000
    started = time.monotonic()
    entries, bad = read_dovecot_passwd(f"alice@acme.test:{junk}\nbob@acme.test:{sha512}{sha512}\n")
    assert time.monotonic() - started < 2
    assert entries == []
    assert [(b.line, b.why) for b in bad] == [
        (1, "longer than 1024 characters: not a password hash"), (2, "malformed SHA512-CRYPT hash")]


def test_a_retired_password_cannot_be_deleted_so_a_reimport_never_gives_it_back(tmp_path, sha512):
    """"A password already retired here is not given back" rests on its retired record: an
    editor tidying up revoked entries (`key delete`) removed it, and the next import of the
    same file (as the README has operators do while both systems run) made the old password
    log in again."""
    cli = CLI(tmp_path)
    cli.ok("init")
    (tmp_path / "users").write_text(f"alice@acme.test:{sha512}\n")
    cli.ok("import", "dovecot-passwd", "users", "--workspace", "acme")
    (legacy,) = cli.json("legacy", "list")
    cli.ok("key", "revoke", legacy["id"])
    refused = cli.refused("key", "delete", legacy["id"], "--yes")
    assert refused.startswith(f"keystore: {legacy['id']} is a retired legacy password"), refused
    out = cli.ok("import", "dovecot-passwd", "users")
    assert out.splitlines()[:2] == [
        "imported from users: 0 legacy password(s) created, 0 updated, 0 unchanged, 0 new mailbox(es)",
        "not given back (retired here already): alice@acme.test"]
    assert [k["state"] for k in cli.json("legacy", "list", "--all")] == ["retired"]
