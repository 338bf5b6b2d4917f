"""`make run`, the README's first command, as a developer runs it on a fresh checkout: it
needs nothing edited, prints the console's address and an owner token that works, and a
key made with that token sends a message that lands in var/sink/. Ctrl-C stops it all.

It runs in a copy of the project's Makefile and example config (so var/ and certs/ are
fresh) with this checkout's virtualenv, on the example config's fixed loopback ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PORTS = (2587, 2465, 2525, 8025, 9587)  # config.example.toml's listeners, the dev sink's


def port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Output:
    """What `make run` prints, read on a thread as it comes."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._lock:
                self.text += line

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._stream.close()

    def find(self, pattern: str) -> str | None:
        with self._lock:
            match = re.search(pattern, self.text)
        return match.group(1) if match else None


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
async def test_make_run_starts_relay_sink_and_console_with_a_working_owner_token(tmp_path):
    busy = [port for port in PORTS if port_in_use(port)]
    if busy:
        pytest.skip(f"ports {busy} are in use (a `make run` of yours?): the example config needs them")
    for name in ("Makefile", "config.example.toml", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("RELAY_CONFIG", "MAKEFLAGS")}
    # -o: the virtualenv is this checkout's, already installed; do not reinstall it here
    proc = subprocess.Popen(["make", "-o", ".venv/bin/relay", "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = Output(proc.stdout)
    try:
        console, owner_token = r"admin console on (http://\S+)", r"(?m)^\s+(rat_\S+)$"
        await wait_until(lambda: output.find(console) and output.find(owner_token), 60,
                         "the console's address and an owner token in make run's output")
        await wait_until(lambda: port_in_use(2587) and port_in_use(2525), 30, "the relay and the sink")
        url, token = output.find(console), output.find(owner_token)
        assert url == "http://127.0.0.1:8025/", output.text

        with httpx.Client(base_url=url + "api/v1", headers={"Authorization": f"Bearer {token}"},
                          timeout=10) as api:
            assert api.post("/mailboxes", json={"address": "me@example.com",
                                                "workspace": "default"}).status_code == 201
            created = api.post("/keys", json={"mailbox": "me@example.com", "name": "make run test"})
            assert created.status_code == 201, created.text
            secret = created.json()["secret"]

        context = ssl.create_default_context(cafile=tmp_path / "certs" / "dev.crt")
        context.check_hostname = False
        with smtplib.SMTP("127.0.0.1", 2587, timeout=10) as client:
            client.starttls(context=context)
            client.login("me@example.com", secret)
            client.sendmail("me@example.com", ["you@example.net"],
                            b"From: me@example.com\r\nSubject: make run\r\n\r\nhello\r\n")
        sink = tmp_path / "var" / "sink"
        await wait_until(lambda: sink.is_dir() and any(sink.iterdir()), 30, "the message in var/sink/")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            output.close()
    assert proc.returncode is not None
    await wait_until(lambda: not any(port_in_use(port) for port in PORTS), 30,
                     "every process of make run to stop at Ctrl-C")
