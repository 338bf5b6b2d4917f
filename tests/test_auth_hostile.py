"""AUTH against clients that get it wrong on purpose or by accident: overlong answers,
odd spellings the RFCs allow, keys typed into the username field, and a keystore whose
write lock someone else holds."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import sqlite3
import time

import aiosmtplib

from keystore import keys
from relay.maillog import KeyRedactor
from tests.support.procs import free_port, prepare_relay_folder, start_relay_process
from tests.support.relayrun import client_tls

MESSAGE = b"From: alice@example.com\r\n\r\nx\r\n"
TOO_LONG = (500, "5.5.6 Authentication Exchange line is too long")


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


async def test_an_overlong_answer_gets_500_5_5_6_and_the_session_goes_on(h, caplog):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    assert (await client.execute_command(b"AUTH", b"PLAIN"))[0] == 334
    assert tuple(await client.execute_command(b"A" * 5000)) == TOO_LONG
    # the rest of the long line was not taken for commands: the next command is answered
    assert (await client.execute_command(b"NOOP"))[0] == 250
    assert (await client.auth_plain("alice@example.com", secret)).code == 235
    client.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_an_overlong_password_counts_as_a_failed_attempt(relay_with):
    async with relay_with(auth="max_failures = 1") as h:
        client = await h.client()
        assert (await client.execute_command(b"AUTH", b"LOGIN", b64("alice@example.com")))[0] == 334
        assert tuple(await client.execute_command(b"B" * 3000)) == TOO_LONG
        code, message = await client.execute_command(
            b"AUTH", b"PLAIN", b64("\0alice@example.com\0rak_whatever"))
        assert (code, message[:6]) == (421, "4.7.0 ")
        client.close()


async def test_mechanism_names_are_case_insensitive(h):
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    client = await h.client()
    code, message = await client.execute_command(b"AUTH", b"plain", b64(f"\0alice@example.com\0{secret}"))
    assert (code, message) == (235, "2.7.0 Authentication successful")
    client.close()
    client = await h.client()
    assert (await client.execute_command(b"AUTH", b"Login"))[0] == 334
    assert (await client.execute_command(b64("alice@example.com")))[0] == 334
    assert (await client.execute_command(b64(secret)))[0] == 235
    client.close()


async def test_an_initial_response_of_equals_is_an_empty_one(h):
    client = await h.client()
    # for PLAIN an empty message is a malformed one, not undecodable base64
    code, message = await client.execute_command(b"AUTH", b"PLAIN", b"=")
    assert (code, message) == (501, "5.5.2 Can't split auth value")
    # for LOGIN an empty username: the relay goes on to ask for the password
    code, message = await client.execute_command(b"AUTH", b"LOGIN", b"=")
    assert (code, base64.b64decode(message)) == (334, b"Password:")
    code, message = await client.execute_command(b64("rak_not_a_key"))
    assert (code, message) == (535, "5.7.8 Authentication credentials invalid")
    client.close()


async def test_a_login_does_not_wait_for_the_keystore_write_lock(h):
    """A backup or a long `keystore` transaction holds the write lock while the relay's
    last-use bookkeeping waits for it: logins read beside it, at full speed."""
    await h.mailbox("alice@example.com")
    secret = await h.key("alice@example.com")
    store = h.relay.store
    client = await h.login("alice@example.com", secret)  # its last use is now to be written
    client.close()
    other = sqlite3.connect(h.folder / "keystore.db", isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    try:
        deadline = time.monotonic() + 5
        while store._uses and time.monotonic() < deadline:  # the write has started, and waits
            await asyncio.sleep(0.01)
        assert not store._uses
        started = time.monotonic()
        client = await h.login("alice@example.com", secret)
        elapsed = time.monotonic() - started
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        client.close()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert elapsed < 1.0, f"AUTH took {elapsed:.2f}s behind a held write lock"
    await h.sink.wait_for(1)


async def test_a_key_typed_as_the_username_never_reaches_the_log(tmp_path, sink):
    """Swapped username and password, a key pasted at a prompt or sent as a command: at
    DEBUG the relay's log shows `rak_<id>_…`, never the secret."""
    port = free_port()
    config, key = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
    secret_part = key.split("_", 2)[2]
    relay = await start_relay_process(config, port, log_level="DEBUG")
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                 tls_context=client_tls(tmp_path), timeout=5)
        await client.connect()
        await client.ehlo()
        assert (await client.execute_command(b"AUTH", b"PLAIN", b64(f"\0{key}\0alice@example.com")))[0] == 535
        assert (await client.execute_command(b"AUTH", b"LOGIN", b64(key)))[0] == 334
        assert (await client.execute_command(b64("alice@example.com")))[0] == 535
        assert (await client.execute_command(b"AUTH", b"LOGIN"))[0] == 334
        assert (await client.execute_command(key.encode()))[0] == 501  # not base64
        client.close()
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                                 tls_context=client_tls(tmp_path), timeout=5)
        await client.connect()
        await client.ehlo()
        assert (await client.execute_command(key.encode()))[0] == 500  # as a command
        client.close()
    finally:
        relay.terminate()
        await relay.wait()
    log = (tmp_path / "relay.log").read_text()
    assert "relay.mail: auth_failed " in log
    assert f"rak_{key.split('_')[1]}_…" in log
    assert secret_part.lower() not in log.lower()
    assert secret_part[:20] not in log


def test_the_log_filter_redacts_keys_from_any_library():
    """What relay/cli.py puts on its log handlers, so a line from aiosmtpd or a traceback
    quoting a key is redacted too."""
    key = keys.generate_key()[0]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(KeyRedactor())
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    try:
        logger.warning("unrecognised: %s", key.upper())
        try:
            raise ValueError(f"bad key {key}")
        except ValueError:
            logger.exception("while reading %r", key.encode())
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    secret = key.split("_", 2)[2]
    assert secret.lower() not in written.lower()
    assert written.lower().count(f"rak_{key.split('_')[1]}_…") == 3
