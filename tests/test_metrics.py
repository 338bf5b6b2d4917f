"""The operations endpoint on `[metrics] listen`, read the way Prometheus and a load
balancer read it: real HTTP requests (urllib) to the real relay, the page parsed with
prometheus-client's own parser, exact counter values after a scripted session."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import aiosmtplib
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from keystore import keys
from relay.config import ConfigError, load_config
from relay.metrics import AUTH_OUTCOMES, REFUSAL_REASONS
from tests.conftest import running_relay
from tests.support.fs import fill, small_filesystem
from tests.support.relayrun import write_config
from tests.support.waiting import wait_until

ALICE = "alice@example.com"
MESSAGE = f"From: {ALICE}\r\nSubject: metrics\r\n\r\nhello\r\n".encode()


def metrics_table(listen: str = "127.0.0.1:0", *, key_id_labels: bool = False) -> str:
    """A [metrics] table, passed as write_config's upstream_extra: [[upstream]] is the last
    table of its file, so a table written after its keys starts a table of its own."""
    return f'\n[metrics]\nlisten = "{listen}"\nkey_id_labels = {str(key_id_labels).lower()}\n'


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, whatever the status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


async def fetch(h, path: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(get, h.relay.metrics_endpoint.port, path)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(h) -> Samples:
    """The page's samples by name and labels; every one must carry this relay's node label
    (taken off here, so lookups name only the labels that vary)."""
    status, content_type, text = await fetch(h, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    node = h.relay.config.cluster.node
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("node", None) == node, f"{sample.name} lacks node={node!r}"
            samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def scrape_until(h, check, what: str, timeout: float = 10.0) -> Samples:
    """Scrape until `check(samples)` holds (the relay counts after the event, not before)."""
    last: list[Samples] = []

    async def holds() -> bool:
        last[:] = [await scrape(h)]
        return check(last[0])

    await wait_until(holds, timeout, what)
    return last[0]


async def test_a_scripted_session_gives_exact_counts_on_the_metrics_page(tmp_path, sink):
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table()) as h:
        await h.mailbox(ALICE)
        secret = await h.key(ALICE)
        key_id = keys.parse_key(secret).key_id
        client = await h.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.auth_plain(ALICE, "not-the-key")  # login() would try LOGIN next
        await client.login(ALICE, secret)
        during = await scrape(h)
        await client.sendmail(ALICE, ["bob@example.net", "carol@example.net"], MESSAGE)
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await client.sendmail("mallory@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        await h.sink.wait_for(1)
        after = await scrape_until(
            h, lambda s: value(s, "keyrelay_delivery_attempts_total", provider="sink", outcome="sent") == 2
            and value(s, "keyrelay_connections_open") == 0, "the delivery and the session's end")

    assert value(during, "keyrelay_connections_open") == 1
    assert value(after, "keyrelay_connections_total") == 1
    assert series(after, "keyrelay_tls_handshakes_total") == {
        (("listener", "submission"), ("outcome", "ok"), ("version", "TLSv1.3")): 1}
    assert series(after, "keyrelay_auth_attempts_total") == {
        (("outcome", outcome),): {"ok": 1, "bad_credentials": 1}.get(outcome, 0) for outcome in AUTH_OUTCOMES}
    assert value(after, "keyrelay_messages_accepted_total") == 1
    assert series(after, "keyrelay_messages_refused_total") == {
        (("reason", reason),): 1 if reason == "sender_not_owned" else 0 for reason in REFUSAL_REASONS}
    assert series(after, "keyrelay_delivery_attempts_total") == {
        (("outcome", "sent"), ("provider", "sink")): 2}
    assert value(after, "keyrelay_delivery_latency_seconds_count", outcome="sent") == 2
    assert 0 < value(after, "keyrelay_delivery_latency_seconds_sum", outcome="sent") < 10
    assert value(after, "keyrelay_delivery_attempt_duration_seconds_count", provider="sink") == 1
    assert series(after, "keyrelay_connections_refused_total") == {
        (("reason", r),): 0 for r in ("max_connections", "per_address", "pre_auth_commands")}
    assert value(after, "keyrelay_queue_messages") == 0
    assert value(after, "keyrelay_queue_oldest_message_age_seconds") == 0
    assert value(after, "keyrelay_provider_up", provider="sink") == 1
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    assert value(after, "keyrelay_tls_certificate_expiry_timestamp_seconds") == \
        cert.not_valid_after_utc.timestamp()
    # no client address, key id, username or sender in any label, by default
    label_values = {v for (_, labels) in after for _, v in labels}
    assert not any(text in v for v in label_values
                   for text in ("127.0.0.1", key_id, ALICE, "mallory", "bob@", "not-the-key"))


async def test_key_ids_are_labels_only_when_asked_and_never_a_made_up_one(tmp_path, sink):
    made_up = keys.generate_key()[0]  # well-formed, checksum and all, but no such key
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table(key_id_labels=True)) as h:
        await h.mailbox(ALICE)
        secret = await h.key(ALICE)
        key_id = keys.parse_key(secret).key_id
        client = await h.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.auth_plain(ALICE, made_up)
        await client.login(ALICE, secret)
        await client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
        with pytest.raises(aiosmtplib.SMTPSenderRefused):
            await client.sendmail("mallory@example.com", ["bob@example.net"], MESSAGE)
        await client.quit()
        samples = await scrape(h)

    assert series(samples, "keyrelay_auth_attempts_total") == {
        (("key", ""), ("outcome", "bad_credentials")): 1, (("key", key_id), ("outcome", "ok")): 1}
    assert series(samples, "keyrelay_messages_accepted_total") == {(("key", key_id),): 1}
    assert series(samples, "keyrelay_messages_refused_total") == {
        (("key", key_id), ("reason", "sender_not_owned")): 1}
    label_values = {v for (_, labels) in samples for _, v in labels}
    assert keys.parse_key(made_up).key_id not in label_values


async def test_refusals_and_failed_handshakes_are_counted_by_reason(tmp_path, sink):
    one_each = "max_connections_per_address = 1"
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table(), server=one_each) as h:
        first = await h.client()
        with pytest.raises(aiosmtplib.SMTPConnectError):
            await h.client()
        await first.quit()
        await scrape_until(h, lambda s: value(s, "keyrelay_connections_open") == 0, "the slot back")
        # plain text on the implicit-TLS listener: a failed handshake, not a session
        _, writer = await asyncio.open_connection("127.0.0.1", h.implicit_port)
        writer.write(b"EHLO plain.example\r\n")
        await writer.drain()
        writer.close()
        samples = await scrape_until(
            h, lambda s: value(s, "keyrelay_tls_handshakes_total", listener="submissions", outcome="failed",
                               version="none") == 1, "the failed handshake")

    assert value(samples, "keyrelay_connections_refused_total", reason="per_address") == 1
    assert value(samples, "keyrelay_connections_refused_total", reason="max_connections") == 0
    assert value(samples, "keyrelay_connections_total") == 2
    assert series(samples, "keyrelay_tls_handshakes_total") == {
        (("listener", "submission"), ("outcome", "ok"), ("version", "TLSv1.3")): 1,
        (("listener", "submissions"), ("outcome", "failed"), ("version", "none")): 1,
    }


async def test_queue_depth_and_oldest_age_show_a_waiting_and_a_held_message(tmp_path, sink):
    sink.handler.data_reply = "451 4.3.0 try again later"
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table(), retry='["1h"]') as h:
        await h.mailbox(ALICE)
        client = await h.login(ALICE, await h.key(ALICE))
        await client.sendmail(ALICE, ["bob@example.net"], MESSAGE)
        await client.quit()
        store = h.relay.queue.store

        async def attempted() -> list:
            infos = await store.messages()
            return infos if infos and infos[0].attempts == 1 else []

        await wait_until(attempted, timeout=10, what="the first attempt recorded")
        (info,) = await attempted()
        before = time.time() - info.created
        samples = await scrape(h)
        after = time.time() - info.created
        assert value(samples, "keyrelay_queue_messages") == 1
        assert value(samples, "keyrelay_queue_held_messages") == 0
        assert before <= value(samples, "keyrelay_queue_oldest_message_age_seconds") <= after
        assert value(samples, "keyrelay_delivery_attempts_total", provider="sink", outcome="deferred") == 1
        assert value(samples, "keyrelay_delivery_latency_seconds_count", outcome="sent") is None  # not final

        await store.hold(info.id)
        samples = await scrape(h)
        assert value(samples, "keyrelay_queue_messages") == 1
        assert value(samples, "keyrelay_queue_held_messages") == 1


async def test_healthz_answers_503_in_time_while_the_event_loop_is_blocked(tmp_path, sink):
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table()) as h:
        port = h.relay.metrics_endpoint.port
        assert await fetch(h, "/healthz") == (200, "application/json", '{"status": "ok"}\n')
        status, content_type, body = await fetch(h, "/nothing-here")
        assert (status, content_type) == (404, "application/json")
        assert json.loads(body)["error"] == "not found"

        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(3.0)

        def probe(path: str) -> tuple[int, str, float]:
            assert blocked.wait(10)
            began = time.monotonic()
            status, _, body = get(port, path)
            return status, body, time.monotonic() - began

        # The relay's loop is this test's loop: a callback that sleeps blocks them both
        # for 3 s, while the probes (on threads) wait for it to answer.
        loop = asyncio.get_running_loop()
        probes = [loop.run_in_executor(None, probe, path) for path in ("/healthz", "/readyz")]
        loop.call_soon(block)
        health, ready = await asyncio.gather(*probes)
        assert health[:2] == (503, '{"status": "the event loop did not answer within 1 s"}\n')
        assert 0.9 < health[2] < 2.5  # answered while the loop was still blocked: no hang
        assert ready[0] == 503 and ready[2] < 2.5
        assert json.loads(ready[1]) == {
            "ready": False, "failing": {"event_loop": "the event loop did not answer within 1 s"}}
        assert (await fetch(h, "/healthz"))[0] == 200


async def test_readyz_names_a_keystore_that_cannot_be_read(tmp_path, sink):
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table()) as h:
        assert await fetch(h, "/readyz") == (200, "application/json", '{"ready": true}\n')
        keystore = tmp_path / "keystore.db"
        keystore.rename(tmp_path / "keystore.db.moved")  # an operator's slip
        try:
            status, _, body = await fetch(h, "/readyz")
        finally:
            (tmp_path / "keystore.db.moved").rename(keystore)
        assert status == 503
        assert json.loads(body) == {
            "ready": False, "failing": {"keystore": f"{keystore}: unable to open database file"}}
        assert not keystore.with_name("keystore.db.moved").exists()
        assert (await fetch(h, "/readyz"))[0] == 200


async def test_readyz_names_a_full_spool_filesystem(tmp_path, sink):
    with small_filesystem(tmp_path / "spoolfs", "8m") as fs:
        spool = "spoolfs/spool.db"
        async with running_relay(tmp_path, sink, upstream_extra=metrics_table(), spool=spool) as h:
            assert (await fetch(h, "/readyz"))[0] == 200
            filler = await asyncio.to_thread(fill, fs)
            status, _, body = await fetch(h, "/readyz")
            assert status == 503
            assert json.loads(body) == {
                "ready": False, "failing": {"spool": f"{fs}: cannot write: No space left on device"}}
            filler.unlink()
            assert (await fetch(h, "/readyz"))[0] == 200
            assert [p.name for p in fs.iterdir() if p.name.startswith(".readyz")] == []


async def test_readyz_is_503_once_the_listeners_are_closed_and_stop_unbinds_the_port(tmp_path, sink):
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table()) as h:
        port = h.relay.metrics_endpoint.port
        for listener in h.relay.listeners:
            listener.server.close()
        status, _, body = await fetch(h, "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "failing": {"listeners": "0 of 2 SMTP listeners serving"}}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _held_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


async def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error(tmp_path, sink):
    with _held_port() as holder:
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        config = load_config(write_config(tmp_path, sink.port, upstream_extra=metrics_table(listen)))
        from relay.app import Relay

        relay = Relay(config)
        try:
            with pytest.raises(ConfigError) as refused:
                await relay.start()
        finally:
            await relay.stop(grace=0.1)
    assert str(refused.value) == (f"{config.source}: [metrics] listen {listen!r}: "
                                  "cannot listen there: Address already in use")


def test_the_relay_command_exits_2_when_the_metrics_port_is_in_use(tmp_path):
    with _held_port() as holder:
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        path = write_config(tmp_path, 9, upstream_extra=metrics_table(listen))
        from tests.support.procs import keystore_cli

        assert keystore_cli(path, "init").returncode == 0
        done = subprocess.run([sys.executable, "-m", "relay", "--config", str(path), "serve"],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "NOTIFY_SOCKET": ""})
    assert done.returncode == 2
    assert f"[metrics] listen {listen!r}: cannot listen there: Address already in use" in done.stderr


async def test_without_a_listen_address_nothing_is_served(h):
    assert h.relay.metrics_endpoint is None


async def test_every_series_names_its_node_and_a_filtered_scrape_too(tmp_path, sink):
    """Several relays behind one load balancer: each one's series carry its [cluster] node."""
    cluster = '\n[cluster]\nnode = "relay-b"\n'
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table() + cluster) as h:
        samples = await scrape(h)  # asserts node="relay-b" on every sample
        assert value(samples, "keyrelay_connections_total") is not None
        status, _, text = await fetch(h, "/metrics?name[]=keyrelay_connections_total")
        assert status == 200
        (family,) = list(text_string_to_metric_families(text))
        assert [s.labels for s in family.samples] == [{"node": "relay-b"}]
