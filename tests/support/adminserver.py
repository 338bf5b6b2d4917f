"""`keystore serve` as a real process, as an operator runs it, and admin tokens made the
way an operator makes them (`keystore admin-token create`)."""

from __future__ import annotations

import contextlib
import json
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import keystore_cli

READY_PREFIX = "admin console on "


@dataclass
class AdminServer:
    url: str  # "http://127.0.0.1:PORT/" as the ready line said
    proc: subprocess.Popen
    log: Path  # the server's stderr

    def api(self, path: str = "") -> str:
        return f"{self.url}api/v1{path}"

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"keystore serve did not stop at SIGTERM: {self.log.read_text()[-2000:]}") from None
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def start_admin_server(config: Path, *args: str, listen: str | None = "127.0.0.1:0",
                       timeout: float = 15.0) -> AdminServer:
    """Start `keystore --config CONFIG serve [--listen LISTEN]` and wait for its ready line."""
    log = config.parent / "admin-serve.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keystore", "--config", str(config), "serve",
             *(["--listen", listen] if listen else []), *args],
            stdout=subprocess.PIPE, stderr=err, text=True,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if line.startswith(READY_PREFIX):
                    return AdminServer(line[len(READY_PREFIX):].strip(), proc, log)
                if not line:  # stdout closed: it exited
                    break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"keystore serve did not become ready (exit {proc.returncode}): "
                         f"{log.read_text()[-2000:]}")


@contextlib.contextmanager
def admin_server(config: Path, *args: str, listen: str | None = "127.0.0.1:0") -> Iterator[AdminServer]:
    """A running server for the block; it must stop cleanly (exit 0) at SIGTERM after it."""
    server = start_admin_server(config, *args, listen=listen)
    try:
        yield server
    finally:
        status = server.stop()
    assert status == 0, f"keystore serve exited {status} at SIGTERM: {server.log.read_text()[-2000:]}"


@dataclass(frozen=True)
class Token:
    id: str
    name: str
    secret: str

    @property
    def actor(self) -> str:
        """What the audit log records for a change made with this token."""
        return f"token:{self.name} ({self.id})"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def create_token(config: Path, name: str, role: str = "owner", *workspaces: str) -> Token:
    """`keystore admin-token create --json`, as an operator bootstraps the first token."""
    options = [part for w in workspaces for part in ("--workspace", w)]
    result = keystore_cli(config, "admin-token", "create", "--name", name, "--role", role, *options, "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    return Token(created["id"], created["name"], created["secret"])
