"""Nothing answered with 250 is ever lost: SIGKILL after 250, restart, delivery."""

from __future__ import annotations

import asyncio
import signal

import aiosmtplib

from keystore.store import KeyStore
from relay.config import load_config
from tests.support.procs import free_port, start_relay_process
from tests.support.relayrun import BASE_CONFIG, client_tls, make_certs
from tests.support.sink import Sink


async def test_sigkill_after_250_loses_nothing(tmp_path):
    make_certs(tmp_path)
    sink_port, port = free_port(), free_port()
    config_path = tmp_path / "relay.toml"
    config_path.write_text(
        BASE_CONFIG.format(server_extra="", auth_extra="", queue_extra="", upstream_extra="",
                           sink_port=sink_port, retry='["0.2s"]', spool="spool.db")
        .replace('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}"]')
    )
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox("alice@example.com", workspace="w", actor="t")
    _, secret = await store.create_key(mailbox="alice@example.com", name="crm", actor="t")
    await store.close()

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
