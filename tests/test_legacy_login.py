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
import io
import smtplib
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from relay import replies
from relay.config import LogConfig
from relay.logformat import configure_logging, reset_logging
from tests.support.procs import keystore_cli
from tests.support.relayrun import Harness
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

def cli(h: Harness, *args: str) -> str:
    """A real `keystore` process on the relay's config: its stdout; it must succeed."""
    done = keystore_cli(h.config_path, *args)
    assert done.returncode == 0, f"keystore {' '.join(args)}: exit {done.returncode}: {done.stderr}"
    return done.stdout


async def run_cli(h: Harness, *args: str) -> str:
    return await asyncio.to_thread(cli, h, *args)


async def import_passwd(h: Harness, lines: list[str], *, kind: str = "dovecot-passwd",
                        name: str = "users.passwd") -> str:
    """`keystore import dovecot-passwd|htpasswd FILE`, as an operator copies the file over."""
    path = h.folder / name
    path.write_text("\n".join(lines) + "\n")
    return await run_cli(h, "import", kind, str(path))


def passwd_line(address: str, hashed: str, extra: str = "") -> str:
    """A Dovecot passwd-file line: user:password:uid:gid:gecos:home:shell:extra fields."""
    return f"{address}:{hashed}::::::{extra}" if extra else f"{address}:{hashed}"


async def legacy_id(h: Harness, address: str) -> str:
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

def connect(h: Harness) -> smtplib.SMTP:
    """A client on the submission port, after STARTTLS (the relay's certificate checked)."""
    client = smtplib.SMTP("127.0.0.1", h.port, timeout=10)
    client.starttls(context=h.tls)
    client.ehlo()
    return client


def auth(client: smtplib.SMTP, username: str, password: str, mechanism: str = "PLAIN") -> str:
    """One AUTH with `mechanism` (PLAIN or LOGIN, as smtplib's login() would pick): the reply."""
    client.user, client.password = username, password
    try:
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    except smtplib.SMTPAuthenticationError as exc:
        code, text = exc.smtp_code, exc.smtp_error
    return f"{code} {text.decode()}"


def login(h: Harness, username: str, password: str, mechanism: str = "PLAIN") -> smtplib.SMTP:
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


def login_reply(h: Harness, username: str, password: str, mechanism: str = "PLAIN") -> tuple[str, float]:
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


def send_as(h: Harness, username: str, password: str, subject: str, mechanism: str = "PLAIN") -> None:
    """A whole session: log in, send one message, quit."""
    with login(h, username, password, mechanism) as client:
        send(client, username, subject)


def subjects(h: Harness) -> list[str]:
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
