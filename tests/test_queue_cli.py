"""`relay queue` against a running relay: list, show, hold, retry, release, delete, on
either queue backend (the sqlite spool, or the shared queue in PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

MESSAGE = "From: alice@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n"


def queue(h, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(h.config_path), "queue", *args],
                          capture_output=True, text=True, timeout=30)


async def q(h, *args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(queue, h, *args)


@pytest.fixture(name="backend", params=["sqlite", "postgresql"])
def backend_fixture(request) -> dict:
    """running_relay() options for the queue backend under test: none for the sqlite
    spool; [queue] url on a fresh PostgreSQL database and a [cluster] node otherwise."""
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_url")
    return {"queue": f'url = "{url}"', "edit": lambda text: text + '\n[cluster]\nnode = "n1"\nlease = "5s"\n'}


async def test_queue_commands_steer_a_running_relay(relay_with, backend):
    async with relay_with(retry='["1h"]', **backend) as h:
        port = h.sink.port
        await h.sink.stop()  # the provider is down: mail waits in the queue
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        client = await h.login("alice@example.com", secret)
        for subject in ("first", "second", "third"):
            await client.sendmail("alice@example.com", [f"{subject}@example.net"],
                                  MESSAGE.format(subject=subject).encode())
        await client.quit()
        await asyncio.sleep(0.3)  # first attempts fail: connection refused

        listed = await q(h, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [r["recipients"] for r in rows] == [["first@example.net"], ["second@example.net"],
                                                   ["third@example.net"]]
        assert all(r["attempts"] == 1 and "4.4.1" in r["last_error"] for r in rows)
        first, second, third = (r["id"] for r in rows)
        table = await q(h, "list")
        assert first in table.stdout and "NEXT ATTEMPT" in table.stdout

        shown = await q(h, "show", first)
        assert shown.returncode == 0
        assert "Subject: first" in shown.stdout and "first@example.net" in shown.stdout

        assert (await q(h, "hold", first)).returncode == 0
        assert (await q(h, "delete", third)).returncode == 0
        await h.sink.start_on(port)  # provider back; next scheduled attempt is an hour away
        retried = await q(h, "retry", "--all")
        assert retried.returncode == 0 and "1 message(s)" in retried.stdout
        (delivered,) = await h.sink.wait_for(1)
        assert delivered.rcpt_tos == ["second@example.net"]

        refused = await q(h, "retry", first)
        assert refused.returncode == 1 and "on hold" in refused.stderr
        assert (await q(h, "release", first)).returncode == 0
        messages = await h.sink.wait_for(2)
        assert messages[1].rcpt_tos == ["first@example.net"]

        await asyncio.sleep(0.7)  # the deleted one never arrives, and nothing arrives twice
        assert len(h.sink.messages) == 2
        empty = await q(h, "list")
        assert empty.stdout.strip() == "the queue is empty"


async def test_unknown_message_id_is_refused(relay_with, backend):
    async with relay_with(**backend) as h:
        for action in ("show", "retry", "delete", "hold", "release"):
            result = await q(h, action, "nosuchid")
            assert result.returncode == 1
            assert result.stderr.strip() == "relay: no message nosuchid in the queue"
