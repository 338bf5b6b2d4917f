"""The relay's log as an operator reads it: one `event key=value` line per event, tied
together by a session id, the same fields as JSON objects with `[log] format = "json"`,
the level changed while running, and no key secret in any line, even at DEBUG, however a
client misplaces its key.

In-process tests capture the log through `configure_logging`, the handler, formatter and
filter `relay serve` installs; the DEBUG scans run `relay serve` itself and read its stderr.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
import re
import ssl
import subprocess
import sys

import aiosmtplib
import pytest

from keystore.store import KeyStore
from relay import replies
from relay.config import LogConfig, load_config
from relay.logformat import configure_logging, reset_logging, set_level
from tests.support.procs import free_port, start_relay_process
from tests.support.relayrun import client_tls, write_config
from tests.support.waiting import wait_until

ALICE = "alice@example.com"
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"

# The README's "Logs" table: every event and its fields, in order.
FIELDS = {
    "connect": ["session", "client", "port", "listener"],
    "tls": ["session", "client", "version", "cipher"],
    "tls_failed": ["session", "client", "port", "listener", "error"],
    "refused": ["client", "port", "listener", "reason"],
    "auth_ok": ["session", "client", "tls", "mailbox", "key"],
    "auth_failed": ["session", "client", "tls", "username", "reason"],
    "rejected": ["session", "client", "tls", "key", "code", "reply"],
    "queued": ["session", "client", "tls", "id", "key", "mailbox", "from", "rcpts", "size"],
    "disconnect": ["session", "client", "duration", "messages"],
    **{name: ["id", "key", "mailbox", "to", "upstream", "attempt", "delay", "code", "reply"]
       for name in ("sent", "deferred", "bounced")},
}
_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")
# README: a value is bare (no space, quote, = or backslash) or a JSON string
_FIELD = re.compile(r' ([a-z]+)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)')


def parse_event(message: str) -> dict[str, str]:
    """An event line's message read by the README's rule alone: {"event": name, field: value}."""
    event, _, rest = message.partition(" ")
    fields = {"event": event}
    position = 0
    for match in _FIELD.finditer(" " + rest):
        assert match.start() == position, f"not key=value at {position}: {rest!r}"
        value = match.group(2)
        fields[match.group(1)] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    assert position == len(rest) + 1, f"left over: {rest[position - 1:]!r}"
    return fields


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


class Captured:
    """The relay's log output, as `relay serve` would write it, into a string."""

    def __init__(self, fmt: str, level: str = "info") -> None:
        self.stream = io.StringIO()
        configure_logging(LogConfig(level=level, format=fmt), stream=self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self, *names: str) -> list[dict[str, str]]:
        """The text format's event lines, each as {"event": name, field: value} (values
        unquoted), in the order written."""
        found = []
        for line in self.text.splitlines():
            match = _LINE.match(line)
            if not match or match.group(2) != "relay.mail":
                continue
            fields = parse_event(match.group(3))
            if not names or fields["event"] in names:
                found.append(fields)
        return found


@pytest.fixture
def capture():
    made: list[Captured] = []

    def start(fmt: str = "text", level: str = "info") -> Captured:
        made.append(Captured(fmt, level))
        return made[-1]

    yield start
    reset_logging()


async def _setup(h) -> tuple[str, str]:
    await h.mailbox(ALICE)
    key = await h.key(ALICE)
    return key, key.split("_")[1]


# ------------------------------------------------------------------ text format

async def test_a_session_is_one_line_per_event_tied_by_its_session_id(h, capture):
    log = capture("text")
    key, key_id = await _setup(h)
    client = await h.client()
    assert (await client.execute_command(b"AUTH", b"PLAIN", b64(f"\0{ALICE}\0rak_wrong")))[0] == 535
    assert (await client.auth_plain(ALICE, key)).code == 235
    assert (await client.execute_command(b"MAIL", b"FROM:<mallory@example.com>"))[0] == 553
    _, reply = await client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
    await client.quit()
    await h.sink.wait_for(1)
    await wait_until(lambda: log.events("sent", "disconnect")[1:], what="sent and disconnect lines")

    events = log.events()
    session = events[0]["session"]
    assert re.fullmatch(r"[0-9a-f]{10}", session)
    mine = [e for e in events if e.get("session") == session]
    assert [e["event"] for e in mine] == [
        "connect", "tls", "auth_failed", "auth_ok", "rejected", "queued", "disconnect"]
    connect, tls, failed, ok, rejected, queued, disconnect = mine
    assert connect == {"event": "connect", "session": session, "client": "127.0.0.1",
                       "port": str(h.port), "listener": "submission"}
    assert tls["version"] == "TLSv1.3" and tls["cipher"].startswith("TLS_")
    assert failed == {"event": "auth_failed", "session": session, "client": "127.0.0.1",
                      "tls": "TLSv1.3", "username": ALICE, "reason": "bad_credentials"}
    assert ok == {"event": "auth_ok", "session": session, "client": "127.0.0.1", "tls": "TLSv1.3",
                  "mailbox": ALICE, "key": key_id}
    assert rejected == {"event": "rejected", "session": session, "client": "127.0.0.1", "tls": "TLSv1.3",
                        "key": key_id, "code": "553", "reply": replies.SENDER_NOT_OWNED}
    queue_id = reply.split()[-1]
    assert queued["id"] == queue_id and queued["key"] == key_id and queued["mailbox"] == ALICE
    assert (queued["from"], queued["rcpts"]) == (f"<{ALICE}>", "1")
    assert disconnect["messages"] == "1" and float(disconnect["duration"]) >= 0
    (sent,) = log.events("sent")
    assert {k: sent[k] for k in ("id", "key", "mailbox", "to", "upstream", "attempt", "code")} == {
        "id": queue_id, "key": key_id, "mailbox": ALICE, "to": "<bob@example.net>", "upstream": "sink",
        "attempt": "1", "code": "250"}
    for event in events:  # every line has its documented fields, in order
        assert list(event)[1:] == FIELDS[event["event"]], event


async def test_two_sessions_at_once_keep_their_own_ids(h, capture):
    log = capture("text")
    key, _ = await _setup(h)
    first, second = await h.client(), await h.client(implicit=True)
    await second.auth_plain(ALICE, key)
    await first.auth_plain(ALICE, key)
    first.close()
    await second.quit()
    await wait_until(lambda: len(log.events("disconnect")) == 2, what="two disconnect lines")
    by_session: dict[str, list[str]] = {}
    for event in log.events():
        by_session.setdefault(event["session"], []).append(event["event"])
    assert sorted(by_session.values()) == [["connect", "tls", "auth_ok", "disconnect"]] * 2
    connects = {e["listener"]: e for e in log.events("connect")}
    assert connects["submissions"]["port"] == str(h.implicit_port)
    assert connects["submission"]["port"] == str(h.port)


async def test_values_with_spaces_or_quotes_are_json_quoted_and_parse_back(h, capture):
    log = capture("text")
    await _setup(h)
    client = await h.client()
    username = 'bob "the builder"\\ x=1 é\x1b[31m@example.com'
    reply = await client.execute_command(b"AUTH", b"PLAIN", b64(f"\0{username}\0rak_nope"))
    assert reply[0] == 535
    client.close()
    await wait_until(lambda: log.events("auth_failed"), what="the auth_failed line")
    line = next(x for x in log.text.splitlines() if " auth_failed " in x)
    assert ' username="bob \\"the builder\\"\\\\ x=1 é\\u001b[31m@example.com" reason=bad_credentials' in line
    assert "\x1b" not in log.text
    assert log.events("auth_failed")[0]["username"] == username


async def test_a_password_typed_as_the_username_is_not_logged(h, capture):
    """Swapped fields: a legacy password (issue 13) in the username cannot be told from a
    typo the way a key can (keys are cut to `rak_<id>_…`), so a username without an @ is
    logged as not an address, never as typed."""
    log = capture("text")
    await _setup(h)
    client = await h.client()
    reply = await client.execute_command(b"AUTH", b"PLAIN", b64("\0Tr0ub4dor&3 horse\0alice@example.com"))
    assert reply[0] == 535
    client.close()
    await wait_until(lambda: log.events("auth_failed"), what="the auth_failed line")
    assert log.events("auth_failed")[0]["username"] == "(not an address)"
    assert "Tr0ub4dor" not in log.text


async def test_a_refused_connection_is_one_line_with_its_reason(relay_with, capture):
    log = capture("text")
    async with relay_with(server="max_connections_per_address = 1") as h:
        held = await h.client()
        for port in (h.port, h.implicit_port):
            with pytest.raises(aiosmtplib.SMTPConnectError):
                await aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=port == h.implicit_port,
                                      tls_context=h.tls, timeout=5).connect()
        held.close()
        await wait_until(lambda: len(log.events("refused")) == 2, what="two refused lines")
    assert log.events("refused") == [
        {"event": "refused", "client": "127.0.0.1", "port": str(h.port), "listener": "submission",
         "reason": "per_address"},
        {"event": "refused", "client": "127.0.0.1", "port": str(h.implicit_port), "listener": "submissions",
         "reason": "per_address"},
    ]


async def test_failed_tls_handshakes_are_logged_on_both_listeners(h, capture):
    log = capture("text")
    _, implicit = await asyncio.open_connection("127.0.0.1", h.implicit_port)
    implicit.write(b"EHLO not-tls\r\n")  # plaintext on 465
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\nSTARTTLS\r\n")
    while not (await reader.readline()).startswith(b"220 "):
        pass
    writer.write(b"not a ClientHello\r\n\r\n")
    await wait_until(lambda: len(log.events("tls_failed")) == 2, what="two tls_failed lines")
    implicit.close()
    writer.close()
    failed = {e["listener"]: e for e in log.events("tls_failed")}
    assert failed["submissions"]["session"] == "-" and failed["submissions"]["client"] == "127.0.0.1"
    starttls = failed["submission"]
    assert starttls["session"] == log.events("connect")[0]["session"] and starttls["port"] == str(h.port)
    assert "SSL" in starttls["error"] or "ssl" in starttls["error"]


# ------------------------------------------------------------------ JSON format

async def test_json_format_is_one_object_per_line_with_the_documented_keys(h, capture):
    log = capture("json", level="debug")
    key, key_id = await _setup(h)
    client = await h.client()
    peer = repr(client.transport.get_extra_info("sockname")[:2])  # as aiosmtpd logs it
    await client.auth_plain(ALICE, key)
    await client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
    await client.quit()
    await h.sink.wait_for(1)
    logging.getLogger("relay.test").warning("plain line %s", "here")
    # the delivery's own debug line ("recorded ...") comes after its outcome is stored,
    # which may be after the sink has the message: wait for it too (it failed under load)
    await wait_until(lambda: '"event": "sent"' in log.text and '"disconnect"' in log.text
                     and '"logger": "relay.queue"' in log.text, what="lines")
    lines = [json.loads(line) for line in log.text.splitlines()]
    events = [line for line in lines if "event" in line and line["logger"] == "relay.mail"]
    assert sorted(e["event"] for e in events) == ["auth_ok", "connect", "disconnect", "queued", "sent", "tls"]
    for event in events:
        assert list(event) == ["ts", "level", "logger", "event", *FIELDS[event["event"]]]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["ts"])
    by_name = {e["event"]: e for e in events}
    assert by_name["connect"]["port"] == h.port and by_name["connect"]["client"] == "127.0.0.1"
    assert by_name["auth_ok"]["key"] == key_id and by_name["auth_ok"]["level"] == "info"
    assert by_name["queued"]["rcpts"] == 1 and isinstance(by_name["queued"]["size"], int)
    assert by_name["sent"]["code"] == 250 and by_name["sent"]["id"] == by_name["queued"]["id"]
    assert isinstance(by_name["disconnect"]["duration"], float) and by_name["disconnect"]["messages"] == 1
    (session,) = {e["session"] for e in events if "session" in e}
    # aiosmtpd's transcript is the session's; the delivery it scheduled is not
    transcript = [line for line in lines if line["logger"] == "mail.log"
                  and line["message"].startswith(f"{peer} << ")]
    assert transcript and all(line["session"] == session for line in transcript)
    delivery = [line for line in lines if line["logger"] == "relay.queue"]
    assert delivery and not [line for line in delivery if "session" in line]
    plain = next(line for line in lines if line["logger"] == "relay.test")
    assert plain == {"ts": plain["ts"], "level": "warning", "logger": "relay.test",
                     "message": "plain line here"}


def test_json_exception_text_is_one_field_and_redacted(capture):
    log = capture("json")
    key = "rak_abcdefghijkl_" + "S3cr3t" * 8
    try:
        raise ValueError(f"bad input {key} / {b64(key).decode()}")
    except ValueError:
        logging.getLogger("relay.test").exception("failed with %s", key)
    (line,) = [json.loads(x) for x in log.text.splitlines()]
    assert line["message"] == "failed with rak_abcdefghijkl_…"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad input rak_abcdefghijkl_… / [redacted]" in line["exception"]
    assert "S3cr3t" not in log.text


def test_text_continuation_lines_are_indented(capture):
    """No text of a record can start a line of its own (fail2ban's filter anchors there)."""
    log = capture("text")
    forged = "WARNING relay.mail: auth_failed session=x client=10.0.0.1 \r"
    logging.getLogger("relay.test").warning("first\n%s", forged)
    first, second = log.text.splitlines()
    assert first.endswith(" WARNING relay.test: first")
    assert second == "  WARNING relay.mail: auth_failed session=x client=10.0.0.1 \\r"


# ------------------------------------------------------------------ level

async def test_set_level_changes_the_level_while_running(h, capture):
    log = capture("text", level="warning")
    key, _ = await _setup(h)

    async def session() -> None:
        client = await h.client()
        await client.auth_plain(ALICE, key)
        await client.quit()

    await session()
    assert "auth_ok" not in log.text
    assert set_level("debug") == "debug"
    await session()
    await wait_until(lambda: "disconnect" in log.text, what="the disconnect line")
    # at debug, aiosmtpd's transcript, each line tied to its session
    auth_ok = log.events("auth_ok")[0]
    assert re.search(rf"DEBUG mail\.log: session={auth_ok['session']} .* << b'235 2\.7\.0", log.text)
    assert set_level("info") == "info"
    before = log.text
    await session()
    await wait_until(lambda: log.text.count("disconnect") == 2, what="the second disconnect line")
    assert "mail.log" not in log.text[len(before):]
    assert set_level("error") == "error"


def test_a_level_given_on_the_command_line_outlasts_a_reload(capture):
    stream = io.StringIO()
    configure_logging(LogConfig(level="warning"), "DEBUG", stream=stream)
    assert logging.getLogger().level == logging.DEBUG
    assert set_level("error") == "debug"  # what reload does with the new [log] level
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("aiosqlite").level == logging.WARNING  # every query, with its parameters
    with pytest.raises(ValueError, match="log level 'loud': expected one of debug, info, warning, error"):
        configure_logging(LogConfig(), "loud", stream=stream)


def test_a_bad_relay_log_level_in_the_environment_stops_the_start(tmp_path, sink):
    path = write_config(tmp_path, sink.port)
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(path), "serve"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "RELAY_LOG_LEVEL": "loud"})
    assert result.returncode == 2
    assert result.stderr == ("relay: RELAY_LOG_LEVEL: log level 'loud': expected one of debug, info, "
                             "warning, error\n")


# ------------------------------------------------------------------ no secret at DEBUG

def _relay_config(folder, sink_port: int, port: int, implicit_port: int, fmt: str, level: str):
    path = write_config(folder, sink_port, retry='["1s"]', server="rate_per_minute = 0")
    text = path.read_text().replace('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}"]')
    text = text.replace('submissions = ["127.0.0.1:0"]', f'submissions = ["127.0.0.1:{implicit_port}"]')
    path.write_text(text + f'\n[log]\nformat = "{fmt}"\nlevel = "{level}"\n')
    return path


async def _raw_tls_session(port: int, tls: ssl.SSLContext, lines: list[bytes], *, implicit: bool) -> bytes:
    """Send `lines` (each a command, or several pipelined in one write) on a TLS session;
    what came back."""
    if implicit:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                       server_hostname="relay.test")
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(b"STARTTLS\r\n")
        await reader.readline()
        await writer.start_tls(tls, server_hostname="relay.test")
    got = b"" if not implicit else await reader.readline()
    writer.write(b"EHLO client.test\r\n")
    while not (line := await reader.readline()).startswith(b"250 "):
        got += line
    for chunk in lines:
        writer.write(chunk + b"\r\n")
        await writer.drain()
        try:
            got += await asyncio.wait_for(reader.readline(), 5)
        except (TimeoutError, ConnectionError):
            break
        await asyncio.sleep(0)
    writer.close()
    return got


def _secret_forms(key: str, sent_blobs: list[bytes]) -> list[str]:
    """What must never be in the log: the secret part of the key, and every base64 blob
    sent that carries it."""
    return [key.split("_", 2)[2], *(blob.decode() for blob in sent_blobs)]


def _hidden_in_base64(text: str, secret: str) -> list[str]:
    """Base64 runs in `text` whose decoding holds `secret`."""
    found = []
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[:len(chunk) - len(chunk) % 4] if not chunk.endswith("=") else chunk
            try:
                decoded = base64.b64decode(chunk)
            except (binascii.Error, ValueError):
                continue
            if secret.encode() in decoded:
                found.append(run)
    return found


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_key_secret_in_the_debug_log_whatever_a_client_sends(tmp_path, sink, fmt):
    """A real `relay serve` at DEBUG (aiosmtpd's transcript included), a client that puts
    its real key everywhere it can, and an upstream that echoes it back in its replies."""
    port, implicit_port = free_port(), free_port()
    # text: the level comes from --log-level over the config's; json: from [log] level
    config_path = _relay_config(tmp_path, sink.port, port, implicit_port, fmt,
                                "warning" if fmt == "text" else "debug")
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox(ALICE, workspace="w", actor="t")
    _, key = await store.create_key(mailbox=ALICE, name="crm", actor="t")
    await store.close()
    key_rcpt, b64_rcpt = f"{key}@example.net", f"{b64(key).decode()}@example.net"
    sink.handler.rcpt_replies[key_rcpt] = f"450 4.2.1 <{key_rcpt}> mailbox busy, {b64(key).decode()}"
    sink.handler.rcpt_replies[b64_rcpt] = f"550 5.1.1 <{b64_rcpt}> unknown"
    relay = await start_relay_process(config_path, port, log_level="DEBUG" if fmt == "text" else None)
    tls = client_tls(tmp_path)
    blobs = [
        b64(f"\0{key}\0{ALICE}"), b64(f"\0{ALICE}\0{key}"), b64(key), b64(b64(key)), b64(f"{ALICE}\0{key}"),
        b64(f"x{key}"), b64(f"xy{key}"),
    ]
    try:
        sessions = [
            # the key as the username (PLAIN), at the LOGIN username prompt, raw at a prompt
            [b"AUTH PLAIN " + blobs[0], b"AUTH LOGIN " + blobs[2], b64(ALICE), b"AUTH LOGIN", key.encode()],
            # lower case, the key base64-encoded twice as a username, a bogus mechanism
            [b"auth plain " + b64(f"\0{b64(key).decode()}\0{key}"), b"AUTH LOGIN",
             blobs[3], blobs[2], b"AUTH XOAUTH2 " + blobs[1]],
            # the key as a command, base64 where a command belongs, in arguments, pipelined
            [key.encode(), blobs[2], b"NOOP " + key.encode(), b"HELP " + blobs[4],
             b"RSET\r\n" + key.encode().upper() + b"\r\nVRFY " + blobs[5] + b"\r\nNOOP " + blobs[6]],
            # a good login, then the key in MAIL FROM, RCPT and the message
            [b"AUTH PLAIN " + blobs[1], f"MAIL FROM:<{key}@example.com>".encode(),
             f"MAIL FROM:<{ALICE}>".encode(), f"RCPT TO:<{key_rcpt}>".encode(),
             f"RCPT TO:<{b64_rcpt}>".encode(), b"RCPT TO:<bob@example.net>", b"DATA",
             f"From: {ALICE}\r\nX-Key: {key}\r\nSubject: {b64(key).decode()}\r\n\r\n{key}\r\n.".encode(),
             b"QUIT"],
        ]
        for index, lines in enumerate(sessions):
            await _raw_tls_session(implicit_port if index % 2 else port, tls, lines, implicit=bool(index % 2))
        # the message reaches the sink for bob; the two others are deferred and bounced
        await sink.wait_for(2, timeout=10)  # bob's copy, and the bounce to alice
        log_file = tmp_path / "relay.log"
        await wait_until(lambda: "deferred" in log_file.read_text() and "bounced" in log_file.read_text(),
                         timeout=10, what="deferred and bounced lines")
    finally:
        relay.terminate()
        await relay.wait()
    text = (tmp_path / "relay.log").read_text()
    # the scan is worth something: aiosmtpd's transcript and the events are there
    for seen in ("auth_failed", "auth_ok", "queued", "deferred", "bounced", "mail.log", ">> b'NOOP"):
        assert seen in text, seen
    for form in _secret_forms(key, blobs):
        assert form.lower() not in text.lower(), form
    assert _hidden_in_base64(text, key.split("_", 2)[2]) == []
    assert f"rak_{key.split('_')[1]}_…" in text or f"rak_{key.split('_')[1]}_\\u2026" in text
    if fmt == "json":
        for line in text.splitlines():
            record = json.loads(line)  # every line is one object
            assert {"ts", "level", "logger"} <= set(record) and ("event" in record) != ("message" in record)
