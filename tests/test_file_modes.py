"""Secret files as an operator meets them at `relay serve`: the pepper, the TLS private key
and an upstream's password file must be owned by the relay's user with mode 0600 or
stricter; anything else stops the start with exit status 2 and one line naming the file,
its mode and the command that fixes it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keystore.store import KeyStore
from relay.config import load_config
from tests.support.procs import free_port, start_relay_process
from tests.support.relayrun import BASE_CONFIG, make_certs, write_secret

PROVIDER = ('\n[[upstream]]\nname = "provider"\nhost = "127.0.0.1"\nport = 2525\ntls = "none"\n'
            'username = "relay"\npassword_file = "provider-password"\n')
SECRETS = {"pepper": "pepper file", "key.pem": "TLS private key", "provider-password": "password file"}


async def relay_folder(folder: Path, port: int = 0) -> Path:
    """A ready relay setup whose upstream logs in with a password file: the config path."""
    make_certs(folder)
    write_secret(folder / "provider-password", "s3cret\n")
    config_path = folder / "relay.toml"
    config_path.write_text(
        BASE_CONFIG.format(server_extra="", auth_extra="", queue_extra="", upstream_extra=PROVIDER,
                           sink_port=2525, retry='["1s"]', spool="spool.db")
        .replace('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}"]')
    )
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.close()
    return config_path


def serve(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                          capture_output=True, text=True, timeout=30)


def refusal(result: subprocess.CompletedProcess) -> str:
    """Exit 2 and one line on stderr, no traceback; returns that line."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660], ids=lambda mode: f"{mode:04o}")
@pytest.mark.parametrize("name", list(SECRETS))
async def test_a_secret_file_other_users_can_read_or_change_stops_the_start(tmp_path, name, mode):
    config = await relay_folder(tmp_path)
    secret = tmp_path / name
    secret.chmod(mode)
    line = refusal(await asyncio.to_thread(serve, config))
    assert f"{secret}: the {SECRETS[name]} has mode {mode:04o}" in line
    assert line.endswith(f"run `chmod 600 {secret}`")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
@pytest.mark.parametrize("name", list(SECRETS))
async def test_a_secret_file_owned_by_another_user_stops_the_start(tmp_path, name):
    config = await relay_folder(tmp_path)
    secret = tmp_path / name
    os.chown(secret, 4242, -1)  # mode still 0600: the owner could open it up at any time
    line = refusal(await asyncio.to_thread(serve, config))
    assert f"{secret}: the {SECRETS[name]} is owned by uid 4242, not by root" in line
    assert line.endswith(f"run `chown root {secret}`")


async def test_a_missing_password_file_stops_the_start(tmp_path):
    config = await relay_folder(tmp_path)
    (tmp_path / "provider-password").unlink()
    line = refusal(await asyncio.to_thread(serve, config))
    assert "[[upstream]] provider password_file" in line and "file not found" in line


async def test_secret_files_0600_or_stricter_let_the_relay_start(tmp_path):
    port = free_port()
    config = await relay_folder(tmp_path, port)
    (tmp_path / "key.pem").chmod(0o400)
    (tmp_path / "provider-password").chmod(0o400)
    assert {(tmp_path / name).stat().st_mode & 0o777 for name in SECRETS} == {0o600, 0o400}
    proc = await start_relay_process(config, port)
    proc.terminate()
    assert await proc.wait() == 0


async def test_the_relay_started_in_process_checks_the_password_file_too(tmp_path):
    """Relay.start (what `relay serve` runs, and what an embedding program would call)
    refuses it itself, not only the command line."""
    from relay.app import Relay
    from relay.config import ConfigError

    config = await relay_folder(tmp_path)
    (tmp_path / "provider-password").chmod(0o644)
    relay = Relay(load_config(config))
    with pytest.raises(ConfigError, match="the password file has mode 0644"):
        await relay.start()
    await relay.stop(grace=0)
