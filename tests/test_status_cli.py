"""`relay status` as an operator runs it: against a running relay (its spool, its state
file, its certificate), after it stopped, with a state file a dead relay left, and with a
config or spool it cannot read."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from tests.support.procs import free_port
from tests.support.waiting import wait_until
from tests.test_delivery import MESSAGE
from tests.test_queue_cli import q

DOWN_FOR_LONG = 'down_after = 1\nbackoff = "30s"\nmax_backoff = "30s"'


def status_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "status", *args],
                          capture_output=True, text=True, timeout=30)


async def status(config: Path, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(status_cli, config, *args)


async def status_json(config: Path) -> dict:
    result = await status(config, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def state_file(h) -> dict | None:
    try:
        return json.loads((h.folder / "relay-state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def cert_not_after(folder: Path) -> float:
    return x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes()).not_valid_after_utc.timestamp()


async def test_status_of_a_running_relay_then_of_a_stopped_one(relay_with, tmp_path):
    gone = f'\n[[upstream]]\nname = "gone"\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"\n'
    async with relay_with(upstream_extra=gone, retry='["1h"]', health=DOWN_FOR_LONG) as h:
        await h.mailbox("alice@example.com")
        client = await h.login("alice@example.com", await h.key("alice@example.com"))
        await client.sendmail("alice@example.com", ["sent@example.net"], MESSAGE)
        await h.sink.wait_for(1)
        await client.quit()
        # a provider nobody listens for: the first message marks it down, the second waits too
        client = await h.login("alice@example.com", await h.key("alice@example.com", route="gone", name="g"))
        for rcpt in ("first@example.net", "second@example.net"):
            await client.sendmail("alice@example.com", [rcpt], MESSAGE)
        # this session stays open while status runs

        def settled() -> bool:
            state = state_file(h)
            return bool(state) and state["sessions"]["open"] == 1 and not state["providers"][1]["up"] \
                and state["deliveries"]["5m"] == {"sink": {"sent": 1, "deferred": 0, "failed": 0},
                                                  "gone": {"sent": 0, "deferred": 1, "failed": 0}}

        await wait_until(settled, what="the state file to show the session, the down provider and deliveries")
        listed = json.loads((await q(h, "list", "--json")).stdout)
        assert [r["recipients"] for r in listed] == [["first@example.net"], ["second@example.net"]]
        assert (await q(h, "hold", listed[1]["id"])).returncode == 0

        assert (tmp_path / "relay-state.json").stat().st_mode & 0o777 in (0o640, 0o600)  # not world-readable
        report = await status_json(h.config_path)
        now = time.time()
        assert report["relay"]["running"] is True and report["relay"]["pid"] == os.getpid()
        assert report["sessions"] == {"open": 1, "connections": 1}
        queue = report["queue"]
        assert (queue["messages"], queue["held"], queue["oldest_id"]) == (2, 1, listed[0]["id"])
        assert 0 <= queue["oldest_age"] < 30
        sink, gone = report["providers"]
        assert (sink["name"], sink["up"], sink["failures"], sink["down_until"]) == ("sink", True, 0, None)
        assert (gone["name"], gone["up"], gone["failures"], gone["downs"]) == ("gone", False, 1, 1)
        assert now < gone["down_until"] <= now + 30
        assert "451 4.4.1 gone unreachable" in gone["last_error"]
        for window in ("5m", "15m", "60m"):
            assert report["deliveries"][window] == {"sink": {"sent": 1, "deferred": 0, "failed": 0},
                                                    "gone": {"sent": 0, "deferred": 1, "failed": 0}}
        assert report["certificate"]["not_after"] == cert_not_after(tmp_path)

        text = await status(h.config_path)
        assert text.returncode == 0, text.stderr
        out = text.stdout
        assert f"relay:        running, pid {os.getpid()}, started " in out
        assert "sessions:     1 open" in out
        assert "queue:        2 message(s), 1 held, oldest " in out and listed[0]["id"] in out
        expires = r"expires \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in 36[45]d\)"
        assert re.search(r"certificate:  \S+cert\.pem: " + expires, out)
        assert re.search(r"\n  sink +up +\S+ ago +0 +- +-\n", out)
        assert re.search(r"\n  gone +DOWN +\S+ ago +1 +in \d+s +451 4\.4\.1 gone unreachable", out)
        assert re.search(r"\n  gone +0/1/0 +0/1/0 +0/1/0\n  sink +1/0/0 +1/0/0 +1/0/0$", out)
        await client.quit()

    # stopped: the state file is gone; the spool and the certificate still answer
    assert not (tmp_path / "relay-state.json").exists()
    report = await status_json(tmp_path / "relay.toml")
    assert report["relay"]["running"] is False
    assert (report["providers"], report["deliveries"], report["sessions"]) == (None, None, None)
    assert (report["queue"]["messages"], report["queue"]["held"]) == (2, 1)
    assert report["certificate"]["not_after"] == cert_not_after(tmp_path)
    out = (await status(tmp_path / "relay.toml")).stdout
    assert out.startswith("relay:        NOT RUNNING: provider health, deliveries and sessions are "
                          "unavailable (no state file at ")
    assert "queue:        2 message(s), 1 held, oldest " in out and "certificate:  " in out
    assert "providers:" not in out


async def test_a_state_file_left_by_a_dead_relay_is_called_stale(relay_with, tmp_path):
    async with relay_with() as h:
        await wait_until(lambda: state_file(h) is not None, what="the first state file")
        left = state_file(h)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    state = tmp_path / "relay-state.json"
    state.write_text(json.dumps(left | {"pid": int(dead.stdout), "written_at": time.time()}))
    report = await status_json(tmp_path / "relay.toml")
    assert report["relay"]["running"] is False
    assert report["relay"]["detail"] == f"stale: written by pid {int(dead.stdout)}, which is not running"
    assert report["providers"] is None and report["queue"]["messages"] == 0

    state.write_text(json.dumps(left | {"pid": os.getpid(), "written_at": time.time() - 600}))
    out = (await status(tmp_path / "relay.toml")).stdout
    assert f"(stale: last written 10m ago by pid {os.getpid()})" in out


async def test_an_unreadable_config_or_spool_is_one_line_and_exit_1(relay_with, tmp_path):
    async with relay_with():
        pass
    result = await status(tmp_path / "nope.toml")
    assert result.returncode == 1
    assert result.stderr == f"relay: {tmp_path / 'nope.toml'}: file not found\n"
    (tmp_path / "spool.db").write_bytes(b"this is no sqlite database" * 100)
    for name in ("spool.db-wal", "spool.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    result = await status(tmp_path / "relay.toml")
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"relay: \S+spool\.db: the spool cannot be (read|opened): file is not a database\n",
                        result.stderr)
