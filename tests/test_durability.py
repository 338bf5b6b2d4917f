"""Nothing answered with 250 is ever lost: SIGKILL after 250, restart, delivery."""

from __future__ import annotations

import asyncio
import signal

import aiosmtplib

from tests.support.procs import free_port, prepare_relay_folder, start_relay_process
from tests.support.relayrun import client_tls
from tests.support.sink import Sink


async def test_sigkill_after_250_loses_nothing(tmp_path):
    sink_port, port = free_port(), free_port()
    config_path, secret = await prepare_relay_folder(tmp_path, sink_port, port, '["0.2s"]')

    # the upstream is down, so accepted mail can only be in the spool when we kill
    relay = await start_relay_process(config_path, port)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                             tls_context=client_tls(tmp_path), timeout=5)
    await client.connect()
    await client.login("alice@example.com", secret)
    for n in range(3):
        _, reply = await client.sendmail(
            "alice@example.com", [f"rcpt{n}@example.net"],
            f"From: alice@example.com\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode())
        assert reply.startswith("2.0.0 OK queued as")
    relay.send_signal(signal.SIGKILL)
    await relay.wait()
    client.close()

    async with Sink(sink_port) as sink:
        relay = await start_relay_process(config_path, port)
        try:
            messages = await sink.wait_for(3, timeout=10)
            await asyncio.sleep(0.5)  # nothing more (no duplicates) may follow
            subjects = sorted(m.text.split("Subject: ")[1].split("\r\n")[0] for m in sink.messages)
            assert subjects == ["message 0", "message 1", "message 2"]
            assert sorted(m.rcpt_tos[0] for m in messages) == [f"rcpt{n}@example.net" for n in range(3)]
        finally:
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 10) == 0
