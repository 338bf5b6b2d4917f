"""Running the relay and the keystore CLI as real processes, as an operator would."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from keystore.store import KeyStore
from relay.config import load_config
from tests.support.relayrun import BASE_CONFIG, make_certs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keystore_cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keystore", "--config", str(config), *args],
        input=stdin, capture_output=True, text=True, timeout=30,
    )


async def start_relay_process(
    config: Path, port: int, *, log_level: str | None = "INFO", env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """The relay as its own process, its log appended to relay.log beside the config (a
    pipe nobody reads would fill up and block the relay's logging). `log_level=None`:
    no --log-level, the config's [log] level applies."""
    log = config.parent / "relay.log"
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(config),
            *(["--log-level", log_level] if log_level else []), "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=out, env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise AssertionError(f"relay exited early: {log.read_text()[-2000:]}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return proc
    proc.kill()
    await proc.wait()
    raise AssertionError("relay did not start listening")


async def prepare_relay_folder(folder: Path, sink_port: int, port: int, retry: str) -> tuple[Path, str]:
    """A config on fixed ports (a restarted relay must come back on the same one), a keystore
    with alice@example.com and a key for her: (config path, the key)."""
    make_certs(folder)
    config_path = folder / "relay.toml"
    config_path.write_text(
        BASE_CONFIG.format(server_extra="rate_per_minute = 0", auth_extra="", queue_extra="",
                           upstream_extra="", sink_port=sink_port, retry=retry, spool="spool.db")
        .replace('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}"]')
    )
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox("alice@example.com", workspace="w", actor="t")
    _, secret = await store.create_key(mailbox="alice@example.com", name="crm", actor="t")
    await store.close()
    return config_path, secret


def check_processes(parent: int) -> set[int]:
    """A relay's legacy-password check processes (keystore/legacy.py's pool): the children
    of `parent` that multiprocessing's spawn started, read from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"multiprocessing.spawn" in cmdline:
            found.add(int(entry.name))
    return found
