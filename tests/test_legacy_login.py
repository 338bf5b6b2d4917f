"""Legacy passwords (issue 13) logging in through the relay, end to end, as the users of a
Postfix + Dovecot setup moving in would: hashes made by Dovecot's own `doveadm pw` and
Apache's `htpasswd`, imported with a real `keystore import` process, then real smtplib
clients (AUTH PLAIN and AUTH LOGIN over STARTTLS, with their mailbox address and old
password) through the real relay to a real sink.

What a user sees is what is asserted: the replies (a wrong password is the 535 of a wrong
key, a retired password is told to use an auth key), what reaches the sink, the relay's
log lines, and what `keystore legacy list` and `keystore audit` show an operator."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import smtplib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest

from keystore import keys
from keystore.legacy import LEGACY_FAILURE_FLOOR
from relay import replies
from relay.config import LogConfig
from relay.logformat import configure_logging, reset_logging
from tests.support.cluster import running_cluster
from tests.support.procs import free_port, keystore_cli, start_relay_process
from tests.support.relayrun import client_tls, write_config
from tests.support.sink import Sink
from tests.support.waiting import wait_until

# (mailbox, scheme, password): one user per scheme; passwords as people choose them (ASCII:
# smtplib sends nothing else)
USERS = [
    ("sha@example.com", "SHA512-CRYPT", "Sommer 2019! (alt)"),
    ("blf@example.com", "BLF-CRYPT", "correct horse battery"),
    ("argon@example.com", "ARGON2ID", "hunter2-but-longer"),
]
HTPASSWD_USER = ("apache@example.com", "htpasswd -B", "from the apache days")
INVALID = replies.AUTH_INVALID
RETIRED = replies.REASON_REPLIES["password_retired"]
CHANGED = replies.REASON_REPLIES["password_changed"]


class Place(Protocol):
    """A running relay as these steps need it: the in-process Harness (tests/support/
    relayrun.py) or a `relay serve` process (RelayProcess)."""

    folder: Path
    sink: Sink

    @property
    def config_path(self) -> Path: ...

    @property
    def port(self) -> int: ...

    @property
    def tls(self) -> ssl.SSLContext: ...


@dataclass
class RelayProcess:
    """A real `relay serve` process on fixed ports, its log in relay.log beside its config."""

    folder: Path
    sink: Sink
    port: int
    tls: ssl.SSLContext

    @property
    def config_path(self) -> Path:
        return self.folder / "relay.toml"


def doveadm_hash(scheme: str, password: str) -> str:
    """`{SCHEME}hash` as Dovecot's own tool makes it."""
    done = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password],
                          capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def htpasswd_line(user: str, password: str) -> str:
    """`user:hash` as Apache's htpasswd makes it (bcrypt)."""
    done = subprocess.run(["htpasswd", "-nbB", user, password],
                          capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def dovecot_hashes() -> dict[str, str]:
    """mailbox -> its `{SCHEME}hash` (argon2 takes 0.2 s: made once for the module)."""
    return {address: doveadm_hash(scheme, password) for address, scheme, password in USERS}


@pytest.fixture(scope="module")
def apache_line() -> str:
    return htpasswd_line(HTPASSWD_USER[0], HTPASSWD_USER[2])


# ------------------------------------------------------------------ operator steps

def cli(h: Place, *args: str, stdin: str | None = None) -> str:
    """A real `keystore` process on the relay's config: its stdout; it must succeed."""
    done = keystore_cli(h.config_path, *args, stdin=stdin)
    assert done.returncode == 0, f"keystore {' '.join(args)}: exit {done.returncode}: {done.stderr}"
    return done.stdout


async def run_cli(h: Place, *args: str, stdin: str | None = None) -> str:
    return await asyncio.to_thread(lambda: cli(h, *args, stdin=stdin))


async def import_passwd(h: Place, lines: list[str], *, kind: str = "dovecot-passwd",
                        name: str = "users.passwd") -> str:
    """`keystore import dovecot-passwd|htpasswd FILE`, as an operator copies the file over."""
    path = h.folder / name
    path.write_text("\n".join(lines) + "\n")
    return await run_cli(h, "import", kind, str(path))


def passwd_line(address: str, hashed: str, extra: str = "") -> str:
    """A Dovecot passwd-file line: user:password:uid:gid:gecos:home:shell:extra fields."""
    return f"{address}:{hashed}::::::{extra}" if extra else f"{address}:{hashed}"


async def legacy_id(h: Place, address: str) -> str:
    """The id of the mailbox's legacy password, as `keystore legacy list --all` shows it."""
    for line in (await run_cli(h, "legacy", "list", "--all")).splitlines()[1:]:
        columns = line.split()
        if columns[0] == address:
            return columns[1]
    raise AssertionError(f"{address} is not in keystore legacy list")


def legacy_row(listing: str, address: str) -> dict[str, str]:
    """One row of `keystore legacy list` by its column headers."""
    lines = listing.splitlines()
    headers = ["MAILBOX", "ID", "SCHEME", "STATE", "DEADLINE", "LAST USED", "LAST CLIENT", "NEW KEY"]
    starts = [lines[0].index(name) for name in headers]
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        if cells[0] == address:
            return dict(zip(headers, cells, strict=True))
    raise AssertionError(f"{address} is not in:\n{listing}")


def when(text: str) -> float:
    """The CLI's UTC timestamps ("2026-01-02T03:04:05Z") as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ smtplib clients

def connect(h: Place) -> smtplib.SMTP:
    """A client on the submission port, after STARTTLS (the relay's certificate checked).
    Every helper closes its client on the way out, failures included: a TLS socket left
    open by a failed test keeps the relay's event loop from closing (the run hangs)."""
    client = smtplib.SMTP("127.0.0.1", h.port, timeout=10)
    try:
        client.starttls(context=h.tls)
        client.ehlo()
    except BaseException:
        client.close()
        raise
    return client


def auth(client: smtplib.SMTP, username: str, password: str, mechanism: str = "PLAIN") -> str:
    """One AUTH with `mechanism` (PLAIN or LOGIN, as smtplib's login() would pick): the reply."""
    client.user, client.password = username, password
    try:
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    except smtplib.SMTPAuthenticationError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    return f"{code} {text.decode()}"


def login(h: Place, username: str, password: str, mechanism: str = "PLAIN") -> smtplib.SMTP:
    """An open session logged in with the password."""
    client = connect(h)
    try:
        reply = auth(client, username, password, mechanism)
    except BaseException:
        client.close()
        raise
    if reply != replies.AUTH_OK:
        client.close()
        raise AssertionError(reply)
    return client


def hang_up(client: smtplib.SMTP) -> None:
    """QUIT, then close, whatever the relay did to the session meanwhile."""
    try:
        client.quit()
    except smtplib.SMTPException:
        client.close()


@contextlib.asynccontextmanager
async def session(h: Place, username: str, password: str,
                  mechanism: str = "PLAIN") -> AsyncIterator[smtplib.SMTP]:
    """An open logged-in session for a test on the relay's own event loop: smtplib blocks,
    so every step runs in a thread (a QUIT from the loop's thread would wait out its timeout)."""
    client = await asyncio.to_thread(login, h, username, password, mechanism)
    try:
        yield client
    finally:
        await asyncio.to_thread(hang_up, client)


def login_reply(h: Place, username: str, password: str, mechanism: str = "PLAIN") -> tuple[str, float]:
    """A fresh session's AUTH: (the reply, seconds from AUTH to the reply)."""
    with connect(h) as client:
        started = time.monotonic()
        reply = auth(client, username, password, mechanism)
        return reply, time.monotonic() - started


def mail_reply(client: smtplib.SMTP, sender: str) -> str:
    """MAIL FROM on an open session: the reply (a 250 is reset, so the next one can follow)."""
    code, text = client.mail(sender)
    if code == 250:
        client.rset()
    return f"{code} {text.decode()}"


def send(client: smtplib.SMTP, sender: str, subject: str, rcpt: str = "bob@example.net") -> None:
    message = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    assert client.sendmail(sender, [rcpt], message) == {}


def send_as(h: Place, username: str, password: str, subject: str, mechanism: str = "PLAIN") -> None:
    """A whole session: log in, send one message, quit."""
    with login(h, username, password, mechanism) as client:
        send(client, username, subject)


def subjects(h: Place) -> list[str]:
    return [line[len("Subject: "):] for m in h.sink.messages for line in m.text.splitlines()
            if line.startswith("Subject: ")]


# ------------------------------------------------------------------ the relay's log

class RelayLog:
    """The relay's log as `relay serve` writes it (text format, redaction on), in a string."""

    def __init__(self, level: str) -> None:
        self.stream = io.StringIO()
        configure_logging(LogConfig(level=level, format="text"), stream=self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self, event: str) -> list[str]:
        return [line for line in self.text.splitlines() if f"relay.mail: {event} " in line]


@pytest.fixture
def relay_log() -> Iterator[type[RelayLog]]:
    yield RelayLog
    reset_logging()


# ------------------------------------------------------------------ logging in and sending

async def test_each_scheme_logs_in_with_its_password_and_its_message_reaches_the_sink(
        h, dovecot_hashes, apache_line, relay_log):
    log = relay_log("info")
    imported = await import_passwd(h, [passwd_line(a, dovecot_hashes[a]) for a, _, _ in USERS])
    assert "3 legacy password(s) created" in imported
    assert "1 legacy password(s) created" in await import_passwd(
        h, [apache_line], kind="htpasswd", name="htpasswd")
    everyone = [*USERS, HTPASSWD_USER]
    for index, (address, scheme, password) in enumerate(everyone):
        mechanism = "PLAIN" if index % 2 == 0 else "LOGIN"
        await asyncio.to_thread(send_as, h, address, password, f"{scheme} by {mechanism}", mechanism)
        # the other mechanism too: both carry the password the same way to the keystore
        other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
        await asyncio.to_thread(send_as, h, address, password, f"{scheme} by {other}", other)
    await h.sink.wait_for(8, timeout=15)
    assert sorted(subjects(h)) == sorted(f"{s} by {m}" for _, s, _ in everyone for m in ("PLAIN", "LOGIN"))
    assert {m.mail_from for m in h.sink.messages} == {a for a, _, _ in everyone}

    ok = log.lines("auth_ok")
    assert len(ok) == 8
    for address, _, _ in everyone:
        credential = await legacy_id(h, address)
        mine = [line for line in ok if f" mailbox={address} " in line]
        assert len(mine) == 2 and all(line.endswith(f"key={credential} legacy=yes") for line in mine), mine

    # the relay notes each use (one write a second); another process reads it from the keystore
    async def all_used() -> bool:
        listing = await run_cli(h, "legacy", "list")
        return all(legacy_row(listing, a)["LAST USED"] != "-" for a, _, _ in everyone)

    await wait_until(all_used, timeout=10, what="every legacy password's last use recorded")
    listing = await run_cli(h, "legacy", "list")
    for address, _, _ in everyone:
        row = legacy_row(listing, address)
        assert row["LAST CLIENT"] == "127.0.0.1" and row["STATE"] == "active"
        assert abs(when(row["LAST USED"]) - time.time()) < 60


async def test_a_key_of_the_same_mailbox_still_logs_in_beside_its_legacy_password(
        h, dovecot_hashes, relay_log):
    log = relay_log("info")
    address, _, password = USERS[0]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    key = await h.key(address)
    await asyncio.to_thread(send_as, h, address, key, "with the key")
    await asyncio.to_thread(send_as, h, address, password, "with the password")
    await h.sink.wait_for(2, timeout=10)
    key_line, password_line = log.lines("auth_ok")
    assert "legacy" not in key_line and password_line.endswith("legacy=yes")


async def test_a_long_bcrypt_passphrase_and_a_username_in_capitals_log_in_as_under_dovecot(h):
    """bcrypt reads 72 bytes: Dovecot and htpasswd hash a longer passphrase's first 72, and
    the user types the whole of it. Addresses are compared without case, as Dovecot's
    usual `auth_username_format = %Lu` does."""
    passphrase = "the quick brown fox jumps over the lazy dog and then some more words " * 2
    assert len(passphrase) > 72
    await import_passwd(h, [passwd_line("long@example.com", doveadm_hash("BLF-CRYPT", passphrase))])
    await import_passwd(h, [htpasswd_line("longer@example.com", passphrase)], kind="htpasswd", name="ht")
    await asyncio.to_thread(send_as, h, "long@example.com", passphrase, "dovecot", "LOGIN")
    await asyncio.to_thread(send_as, h, "longer@example.com", passphrase, "apache", "PLAIN")
    async with session(h, "Long@EXAMPLE.com", passphrase) as client:
        await asyncio.to_thread(send, client, "long@example.com", "in capitals")
    reply, _ = await asyncio.to_thread(login_reply, h, "long@example.com", passphrase[:60])
    assert reply == INVALID
    await h.sink.wait_for(3, timeout=10)


# ------------------------------------------------------------------ refusals

@pytest.mark.alone  # compares times: with the machine to itself (Makefile)
async def test_a_wrong_password_an_unknown_mailbox_and_one_without_a_password_get_one_reply_in_one_time(
        h, dovecot_hashes, apache_line):
    """No enumeration: the reply is a wrong key's, and each refusal takes at least
    LEGACY_FAILURE_FLOOR (a hash checked or not), so neither words nor time tell which
    mailboxes exist or have a password. A wrong key is checked without any hash: not slowed."""
    await import_passwd(h, [passwd_line(a, dovecot_hashes[a]) for a, _, _ in USERS])
    await import_passwd(h, [apache_line], kind="htpasswd", name="htpasswd")
    await h.mailbox("keys-only@example.com")
    key = await h.key("keys-only@example.com")
    wrong_key, _ = keys.generate_key(key.split("_")[1])  # her key's id, another secret: well-formed
    # the check processes start at the first legacy login: warm them, as a running relay is
    await asyncio.to_thread(send_as, h, USERS[2][0], USERS[2][2], "warm")

    attempts = {
        **{f"wrong password ({scheme})": (address, "not-" + password) for address, scheme, password in USERS},
        "wrong password (htpasswd)": (HTPASSWD_USER[0], "Not the password"),
        "unknown mailbox": ("nobody@example.com", "some password"),
        "mailbox without a password": ("keys-only@example.com", "some password"),
    }
    seen: dict[str, list[float]] = {}
    for what, (username, password) in attempts.items():
        for mechanism in ("PLAIN", "LOGIN"):
            reply, took = await asyncio.to_thread(login_reply, h, username, password, mechanism)
            assert reply == INVALID, (what, reply)
            seen.setdefault(what, []).append(took)
    times = [t for ts in seen.values() for t in ts]
    assert min(times) >= LEGACY_FAILURE_FLOOR, seen
    assert max(times) - min(times) < 0.25, seen  # argon2's 0.2 s hides under the floor

    reply, took = await asyncio.to_thread(login_reply, h, "keys-only@example.com", wrong_key)
    assert reply == INVALID and took < LEGACY_FAILURE_FLOOR / 2, took
    reply, took = await asyncio.to_thread(login_reply, h, USERS[0][0], wrong_key)  # a key of another mailbox
    assert reply == INVALID and took < LEGACY_FAILURE_FLOOR / 2, took


async def test_without_any_legacy_password_a_non_key_password_is_refused_without_the_pad(h):
    """A keystore of keys alone pads nothing: there is no hash whose time could tell."""
    await h.mailbox("keys-only@example.com")
    await h.key("keys-only@example.com")
    reply, took = await asyncio.to_thread(login_reply, h, "keys-only@example.com", "a password")
    assert reply == INVALID and took < LEGACY_FAILURE_FLOOR / 2, took


# ------------------------------------------------------------------ the rules keys follow

async def test_a_legacy_password_sends_as_its_mailbox_and_aliases_only(h, dovecot_hashes):
    address, _, password = USERS[1]
    await h.mailbox(address, aliases=["sales@example.com"])
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    async with session(h, address, password, "LOGIN") as client:
        assert await asyncio.to_thread(mail_reply, client, "mallory@example.com") == replies.SENDER_NOT_OWNED
        assert await asyncio.to_thread(mail_reply, client, "sha@example.com") == replies.SENDER_NOT_OWNED
        await asyncio.to_thread(send, client, "sales@example.com", "from the alias")
        await asyncio.to_thread(send, client, address, "from the mailbox")
    received = await h.sink.wait_for(2, timeout=10)
    assert sorted(m.mail_from for m in received) == [address, "sales@example.com"]


@pytest.mark.parametrize("what", ["mailbox", "workspace"])
async def test_a_suspended_mailbox_or_workspace_stops_its_legacy_password(h, dovecot_hashes, what):
    address, _, password = USERS[0]
    await h.mailbox(address, workspace="acme")
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    async with session(h, address, password) as client:
        assert await asyncio.to_thread(mail_reply, client, address) == replies.MAIL_OK
        await run_cli(h, what, "suspend", address if what == "mailbox" else "acme")
        # the open session: refused at its next MAIL FROM (the recheck's cache is 0.5 s)
        suspended = replies.REASON_REPLIES["suspended"]

        async def refused() -> bool:
            return await asyncio.to_thread(mail_reply, client, address) == suspended

        await wait_until(refused, timeout=5, what="the open session refused as suspended")
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == suspended
    reply, _ = await asyncio.to_thread(login_reply, h, address, "not-" + password)
    assert reply == INVALID  # the suspension is told only to the right password
    await run_cli(h, what, "resume", address if what == "mailbox" else "acme")
    await asyncio.to_thread(send_as, h, address, password, "resumed")
    await h.sink.wait_for(1, timeout=10)


async def test_a_rate_limit_set_on_a_legacy_password_applies(h, dovecot_hashes):
    address, _, password = USERS[1]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    await run_cli(h, "key", "update", await legacy_id(h, address), "--rate-limit", "1")
    async with session(h, address, password) as client:
        await asyncio.to_thread(send, client, address, "the one a minute")
        assert await asyncio.to_thread(mail_reply, client, address) == replies.RATE_LIMITED
    await h.sink.wait_for(1, timeout=10)


async def test_allow_nets_from_the_passwd_file_and_allow_from_apply_to_the_password(h, dovecot_hashes):
    """Dovecot's allow_nets= becomes the credential's allow-from: the right password from
    elsewhere is refused as a key would be; widened with `key update --allow-from`, it logs in."""
    address, _, password = USERS[1]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address], "allow_nets=192.0.2.0/24")])
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == replies.REASON_REPLIES["not_allowed_from"]
    reply, _ = await asyncio.to_thread(login_reply, h, address, "not-" + password)
    assert reply == INVALID
    await run_cli(h, "key", "update", await legacy_id(h, address), "--allow-from", "127.0.0.0/8")
    await asyncio.to_thread(send_as, h, address, password, "from an allowed network")
    await h.sink.wait_for(1, timeout=10)


# ------------------------------------------------------------------ re-checks of open sessions

async def refused_at_mail(client: smtplib.SMTP, sender: str, reply: str, what: str) -> None:
    """The open session's next MAIL FROM gets `reply` (within the recheck's 0.5 s cache)."""
    async def refused() -> bool:
        got = await asyncio.to_thread(mail_reply, client, sender)
        assert got in (replies.MAIL_OK, reply), got
        return got == reply

    await wait_until(refused, timeout=5, what=what)


async def test_a_reimport_with_a_changed_password_ends_open_sessions(h, dovecot_hashes):
    address, scheme, password = USERS[0]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    async with session(h, address, password) as client, session(h, address, password, "LOGIN") as other:
        await asyncio.to_thread(send, client, address, "before the change")
        new_password = "a brand new password"
        changed = await import_passwd(h, [passwd_line(address, doveadm_hash(scheme, new_password))])
        assert "1 updated" in changed
        await refused_at_mail(client, address, CHANGED, "the open session ended: password changed")
        assert await asyncio.to_thread(mail_reply, other, address) == CHANGED
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == INVALID  # the old password is now simply wrong
    await asyncio.to_thread(send_as, h, address, new_password, "after the change", "LOGIN")
    received = await h.sink.wait_for(2, timeout=10)
    assert [m.text.count("before the change") + m.text.count("after the change") for m in received] == [1, 1]


async def test_past_the_legacy_deadline_open_sessions_end_and_the_password_is_told_to_use_a_key(
        h, dovecot_hashes):
    address, _, password = USERS[1]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    async with session(h, address, password) as client:
        deadline = iso(time.time() + 3)  # whole seconds: at least 2 s from now
        stated = await run_cli(h, "legacy", "expire", "--at", deadline, "--mailbox", address)
        assert stated.startswith(f"1 legacy password(s) stop working at {deadline}")
        assert await asyncio.to_thread(mail_reply, client, address) == replies.MAIL_OK  # not yet
        await refused_at_mail(client, address, RETIRED, "the open session refused past the deadline")
    assert when(deadline) <= time.time()
    reply, _ = await asyncio.to_thread(login_reply, h, address, password, "LOGIN")
    assert reply == RETIRED
    reply, _ = await asyncio.to_thread(login_reply, h, address, "not-" + password)
    assert reply == INVALID  # only the right password learns that passwords have ended
    assert legacy_row(await run_cli(h, "legacy", "list", "--all"), address)["STATE"] == "ended"


async def test_a_revoked_legacy_password_ends_open_sessions_with_the_retired_reply(h, dovecot_hashes):
    address, _, password = USERS[2]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    async with session(h, address, password, "LOGIN") as client:
        assert await asyncio.to_thread(mail_reply, client, address) == replies.MAIL_OK
        await run_cli(h, "key", "revoke", await legacy_id(h, address))
        await refused_at_mail(client, address, RETIRED, "the open session refused once revoked")
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == RETIRED
    reply, _ = await asyncio.to_thread(login_reply, h, address, "not-" + password, "LOGIN")
    assert reply == INVALID
    # a re-import does not bring a retired password back
    again = await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    assert f"not given back (retired here already): {address}" in again
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == RETIRED


@pytest.mark.parametrize("how", ["key delete", "mailbox remove --force"])
async def test_a_deleted_legacy_password_ends_open_sessions_telling_them_passwords_have_ended(
        h, dovecot_hashes, how):
    """Its session logged in with a password, not a key: "this auth key has been revoked"
    would puzzle its user; they hear what a retired password hears."""
    address, _, password = USERS[1]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    credential = await legacy_id(h, address)
    async with session(h, address, password) as client:
        assert await asyncio.to_thread(mail_reply, client, address) == replies.MAIL_OK
        if how == "key delete":
            await run_cli(h, "key", "delete", credential, stdin="legacy password\n")  # its name, to confirm
        else:
            await run_cli(h, "mailbox", "remove", address, "--force")
        await refused_at_mail(client, address, RETIRED, "the open session ended with its password")
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == INVALID  # no password any more: nothing to tell


# ------------------------------------------------------------------ moving to keys

async def test_convert_keeps_the_password_until_the_new_key_logs_in_then_retires_it(h, dovecot_hashes):
    address, _, password = USERS[0]
    await import_passwd(h, [passwd_line(address, dovecot_hashes[address])])
    password_id = await legacy_id(h, address)
    converted = json.loads(await run_cli(h, "legacy", "convert", address, "--json"))
    key = converted["secret"]
    await asyncio.to_thread(send_as, h, address, password, "still the password")
    row = legacy_row(await run_cli(h, "legacy", "list"), address)
    assert row["STATE"] == "active" and row["NEW KEY"] == converted["id"]

    async with session(h, address, password, "LOGIN") as old_session:
        await asyncio.to_thread(send_as, h, address, key, "with the new key")

        # the relay's bookkeeping (about a second) sees the key used and retires the password
        async def retired() -> bool:
            listing = await run_cli(h, "legacy", "list", "--all")
            return legacy_row(listing, address)["STATE"] == "retired"

        await wait_until(retired, timeout=10, what="the password retired after the key's first login")
        await refused_at_mail(old_session, address, RETIRED, "the password's open session ended")
    assert address not in await run_cli(h, "legacy", "list")  # live passwords only
    reply, _ = await asyncio.to_thread(login_reply, h, address, password)
    assert reply == RETIRED
    await asyncio.to_thread(send_as, h, address, key, "the key goes on")
    await h.sink.wait_for(3, timeout=10)
    audit = await run_cli(h, "audit", "--mailbox", address)
    retire = [line for line in audit.splitlines() if " legacy.retire " in line]
    assert len(retire) == 1 and password_id in retire[0] and " relay " in retire[0], audit


# ------------------------------------------------------------------ secrets and the log

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_forms(password: str, hashed: str, username: str) -> list[str]:
    """What must never be in the log: the password (also as AUTH PLAIN and LOGIN carry it),
    the hash, and the hash's salt and digest (a hash logged in pieces is still the hash)."""
    pieces = [p for p in hashed.split("$") if len(p) >= 16]
    return [password, b64(password), b64(f"\0{username}\0{password}"), hashed, *pieces]


async def test_no_password_and_no_hash_in_the_relays_debug_log(tmp_path, sink, dovecot_hashes, apache_line):
    """A real `relay serve` with `[log] level = "debug"` (aiosmtpd's transcript of every
    command and reply included): logins of every scheme by PLAIN and LOGIN, wrong passwords,
    a re-import with a changed password, a conversion; then the whole log is searched."""
    port = free_port()
    config = write_config(tmp_path, sink.port, server="rate_per_minute = 0")
    text = config.read_text().replace('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}"]')
    text = text.replace('submissions = ["127.0.0.1:0"]', f'submissions = ["127.0.0.1:{free_port()}"]')
    config.write_text(text + '\n[log]\nlevel = "debug"\n')
    relay = RelayProcess(tmp_path, sink, port, client_tls(tmp_path))
    await run_cli(relay, "init")
    await import_passwd(relay, [passwd_line(a, dovecot_hashes[a]) for a, _, _ in USERS])
    await import_passwd(relay, [apache_line], kind="htpasswd", name="htpasswd")
    changed_user, changed_scheme, _ = USERS[1]
    new_password = "the password after the change"
    new_hash = doveadm_hash(changed_scheme, new_password)
    apache_hash = apache_line.split(":", 1)[1]
    forms = [form for address, _, password in USERS
             for form in secret_forms(password, dovecot_hashes[address].split("}", 1)[1], address)]
    forms += secret_forms(HTPASSWD_USER[2], apache_hash, HTPASSWD_USER[0])
    forms += secret_forms(new_password, new_hash.split("}", 1)[1], changed_user)
    process = await start_relay_process(config, port, log_level=None)
    try:
        everyone = [*USERS, HTPASSWD_USER]
        for address, scheme, password in everyone:
            for mechanism in ("PLAIN", "LOGIN"):
                await asyncio.to_thread(send_as, relay, address, password, f"{scheme} {mechanism}", mechanism)
                reply, _ = await asyncio.to_thread(login_reply, relay, address, password + "x", mechanism)
                assert reply == INVALID
        async with session(relay, changed_user, USERS[1][2], "LOGIN") as client:
            await import_passwd(relay, [passwd_line(changed_user, new_hash)])
            await refused_at_mail(client, changed_user, CHANGED, "the session ended by the new password")
        await asyncio.to_thread(send_as, relay, changed_user, new_password, "new password")
        converted = json.loads(await run_cli(relay, "legacy", "convert", USERS[2][0], "--json"))
        await asyncio.to_thread(send_as, relay, USERS[2][0], converted["secret"], "converted")

        async def retired() -> bool:
            listing = await run_cli(relay, "legacy", "list", "--all")
            return legacy_row(listing, USERS[2][0])["STATE"] == "retired"

        await wait_until(retired, timeout=10, what="the converted password retired")
        reply, _ = await asyncio.to_thread(login_reply, relay, USERS[2][0], USERS[2][2])
        assert reply == RETIRED
        await sink.wait_for(10, timeout=15)
    finally:
        process.terminate()
        await process.wait()
    log = (tmp_path / "relay.log").read_text()
    # the search is worth something: the transcript, the events, a legacy login are there
    for seen in ("mail.log", "AUTH PLAIN ********", "auth_ok", "legacy=yes", "auth_failed", "queued"):
        assert seen in log, seen
    for form in forms:
        assert form not in log, form
    lowered = log.lower()
    assert not [form for form in forms if form.lower() in lowered]


# ------------------------------------------------------------------ PostgreSQL

async def test_on_postgresql_a_legacy_password_logs_in_and_a_reimport_ends_sessions_at_another_relay(
        tmp_path, sink, pg_url, dovecot_hashes):
    """Two relays on one PostgreSQL keystore, rechecks cached for a minute: only the
    keystore's notification (a re-import changes the credential's row) can end the session
    at the other relay within the second."""
    address, scheme, password = USERS[0]
    async with running_cluster(tmp_path, sink, pg_url, auth='recheck_interval = "60s"') as (a, b):
        imported = await import_passwd(a, [passwd_line(address, dovecot_hashes[address])])
        assert "1 legacy password(s) created, 0 updated, 0 unchanged, 1 new mailbox(es)" in imported
        await asyncio.to_thread(send_as, b, address, password, "through b")
        async with session(b, address, password, "LOGIN") as client:
            assert await asyncio.to_thread(mail_reply, client, address) == replies.MAIL_OK  # cached now
            new_password = "changed at the old server"
            await import_passwd(a, [passwd_line(address, doveadm_hash(scheme, new_password))])
            changed = time.monotonic()
            await refused_at_mail(client, address, CHANGED, "the session at b ended by the re-import at a")
            assert time.monotonic() - changed < 1.0
        await asyncio.to_thread(send_as, b, address, new_password, "new password through b")
        await asyncio.to_thread(send_as, a, address, new_password, "new password through a")
        reply, _ = await asyncio.to_thread(login_reply, a, address, password)
        assert reply == INVALID
        received = await sink.wait_for(3, timeout=10)
        assert {m.mail_from for m in received} == {address}
        listing = await run_cli(a, "legacy", "list")
        assert legacy_row(listing, address)["STATE"] == "active"
