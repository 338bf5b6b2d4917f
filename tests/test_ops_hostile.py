"""Operations under attack and carelessness (issue 10's review): a config saved in the
wrong encoding, a hung provider at reload, a flood on the metrics port, a hostile state
file. Each test is what an operator would see; real processes, sockets and files."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.support.relayrun import write_config, write_secret
from tests.support.waiting import wait_until
from tests.test_service import MESSAGE, logged_in, service


async def test_sighup_with_a_config_saved_as_latin1_is_refused_and_the_relay_keeps_running(tmp_path):
    """An editor that saves the config as Latin-1 (a comment with an accent): the reload
    is refused with one line, the relay does not die on the way."""
    async with service(tmp_path) as relay:
        await wait_until(lambda: "relay ready" in relay.log, what="the start")
        relay.config.write_bytes(relay.config.read_bytes() + "\n# r\xe9seau\n".encode("latin-1"))
        relay.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in relay.log or relay.process.returncode is not None,
                         what="the refusal")
        assert relay.process.returncode is None, relay.log[-2000:]
        refusals = [line for line in relay.log.splitlines() if "reload refused" in line]
        assert len(refusals) == 1 and "UTF-8" in refusals[0]
        session = await logged_in(relay.port, tmp_path, relay.secret)
        await session.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await relay.sink.wait_for(1)
        await session.quit()


async def test_a_password_file_that_is_not_utf8_refuses_the_reload(relay_with, tmp_path):
    async with relay_with() as h:
        password = tmp_path / "password"
        write_secret(password, "")
        password.write_bytes(b"\xffsecret\n")
        text = h.config_path.read_text()
        h.config_path.write_text(text.replace(
            'tls = "none"', f'tls = "none"\nusername = "relay"\npassword_file = "{password}"'))
        assert await h.relay.reload() is False


def test_check_config_names_a_config_that_is_not_utf8(tmp_path):
    config = write_config(tmp_path, 2525)
    config.write_bytes(config.read_bytes() + "\n# r\xe9seau\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "problem: " in result.stderr and "UTF-8" in result.stderr


async def test_any_error_while_loading_a_new_config_refuses_the_reload(relay_with):
    """A loader that raises something other than ConfigError (here a NUL in a path, which
    the OS refuses with ValueError) is still a refused reload, not a dead relay."""
    async with relay_with() as h:
        text = h.config_path.read_text()
        h.config_path.write_text(text.replace(
            'tls = "none"', 'tls = "none"\nusername = "relay"\npassword_file = "pass\\u0000word"'))
        assert await h.relay.reload() is False
        assert h.relay.config.upstream[0].password_file is None  # the old config stays


def test_check_config_names_a_path_with_a_nul_character(tmp_path):
    config = write_config(tmp_path, 2525)
    config.write_text(config.read_text().replace('key = "key.pem"', 'key = "key\\u0000.pem"'))
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "problem: " in result.stderr
    assert "[tls] key: a path cannot contain a NUL character" in result.stderr
