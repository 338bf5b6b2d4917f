"""Running the relay and the keystore CLI as real processes, as an operator would."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path


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
    config: Path, port: int, *, log_level: str = "INFO",
) -> asyncio.subprocess.Process:
    """The relay as its own process, its log appended to relay.log beside the config (a
    pipe nobody reads would fill up and block the relay's logging)."""
    log = config.parent / "relay.log"
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(config), "--log-level", log_level, "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=out,
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
