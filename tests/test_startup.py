"""The relay refuses to start on a bad setup, with a message that says what to fix, and
exit status 2 (systemd's RestartPreventExitStatus keeps it from looping)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from keystore.store import KeyStore
from relay.config import load_config
from relay.tlsconf import generate_self_signed
from tests.support.relayrun import write_config


def serve(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                          capture_output=True, text=True, timeout=30)


async def init_keystore(config_path) -> None:
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.close()


async def test_missing_certificate(tmp_path):
    config = write_config(tmp_path, 2525)
    (tmp_path / "cert.pem").unlink()
    await init_keystore(config)
    result = await asyncio.to_thread(serve, config)
    assert result.returncode == 2
    assert "[tls] cert:" in result.stderr and "file not found" in result.stderr


async def test_key_that_does_not_match_the_certificate(tmp_path):
    config = write_config(tmp_path, 2525)
    generate_self_signed("other.test", tmp_path / "other.pem", tmp_path / "key.pem")  # new key
    await init_keystore(config)
    result = await asyncio.to_thread(serve, config)
    assert result.returncode == 2
    assert "does not match cert" in result.stderr


async def test_keystore_not_initialised(tmp_path):
    config = write_config(tmp_path, 2525)
    result = await asyncio.to_thread(serve, config)
    assert result.returncode == 2
    assert "keystore init" in result.stderr


async def test_route_in_the_keystore_that_the_config_does_not_define(tmp_path):
    config_path = write_config(tmp_path, 2525)
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox("alice@example.com", workspace="w", actor="t")
    record, _ = await store.create_key(mailbox="alice@example.com", name="k", actor="t", route="gone")
    await store.close()
    result = await asyncio.to_thread(serve, config_path)
    assert result.returncode == 2
    assert f"key {record.id}" in result.stderr and "'gone'" in result.stderr
