"""Operations under attack and carelessness (issue 10's review): a config saved in the
wrong encoding, a hung provider at reload, a flood on the metrics port, a hostile state
file. Each test is what an operator would see; real processes, sockets and files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from relay.queue.sqlite import SqliteQueueStore
from tests.conftest import running_relay
from tests.support.procs import free_port, keystore_cli, prepare_relay_folder, start_relay_process
from tests.support.relayrun import write_config, write_secret
from tests.support.sink import CountingSMTP, Sink
from tests.support.waiting import wait_until
from tests.test_service import MESSAGE, NotifySocket, logged_in, service


async def test_sighup_with_a_config_saved_as_latin1_is_refused_and_the_relay_keeps_running(tmp_path):
    """An editor that saves the config as Latin-1 (a comment with an accent): the reload
    is refused with one line, the relay does not die on the way."""
    async with service(tmp_path) as relay:
        await wait_until(lambda: "relay ready" in relay.log, what="the start")
        relay.config.write_bytes(relay.config.read_bytes() + "\n# r\xe9seau\n".encode("latin-1"))
        relay.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in relay.log or relay.process.returncode is not None,
                         what="the refusal")
        assert relay.process.returncode is None, relay.log[-2000:]
        refusals = [line for line in relay.log.splitlines() if "reload refused" in line]
        assert len(refusals) == 1 and "UTF-8" in refusals[0]
        session = await logged_in(relay.port, tmp_path, relay.secret)
        await session.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await relay.sink.wait_for(1)
        await session.quit()


async def test_a_password_file_that_is_not_utf8_refuses_the_reload(relay_with, tmp_path):
    async with relay_with() as h:
        password = tmp_path / "password"
        write_secret(password, "")
        password.write_bytes(b"\xffsecret\n")
        text = h.config_path.read_text()
        h.config_path.write_text(text.replace(
            'tls = "none"', f'tls = "none"\nusername = "relay"\npassword_file = "{password}"'))
        assert await h.relay.reload() is False


def test_check_config_names_a_config_that_is_not_utf8(tmp_path):
    config = write_config(tmp_path, 2525)
    config.write_bytes(config.read_bytes() + "\n# r\xe9seau\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "problem: " in result.stderr and "UTF-8" in result.stderr


async def test_any_error_while_loading_a_new_config_refuses_the_reload(relay_with):
    """A loader that raises something other than ConfigError (here a NUL in a path, which
    the OS refuses with ValueError) is still a refused reload, not a dead relay."""
    async with relay_with() as h:
        text = h.config_path.read_text()
        h.config_path.write_text(text.replace(
            'tls = "none"', 'tls = "none"\nusername = "relay"\npassword_file = "pass\\u0000word"'))
        assert await h.relay.reload() is False
        assert h.relay.config.upstream[0].password_file is None  # the old config stays


def test_check_config_names_a_path_with_a_nul_character(tmp_path):
    config = write_config(tmp_path, 2525)
    config.write_text(config.read_text().replace('key = "key.pem"', 'key = "key\\u0000.pem"'))
    result = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "problem: " in result.stderr
    assert "[tls] key: a path cannot contain a NUL character" in result.stderr


@contextlib.asynccontextmanager
async def relay_with_fd_limit(folder: Path, sink: Sink, limit: int, config_extra: str):
    """The relay as a process whose hard RLIMIT_NOFILE is `limit` (as LimitNOFILE= sets it):
    (process, SMTP port, key)."""
    port = free_port()
    config, secret = await prepare_relay_folder(folder, sink.port, port, '["1s"]')
    text = config.read_text().replace("rate_per_minute = 0", "rate_per_minute = 0\nmax_connections = 10")
    config.write_text(text + config_extra)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(folder / "relay.log", "ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(config), "--log-level", "INFO", "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=out, preexec_fn=limited)
    try:
        await wait_until(lambda: "relay ready" in (folder / "relay.log").read_text()
                         or process.returncode is not None, timeout=15, what="the start")
        assert process.returncode is None, (folder / "relay.log").read_text()[-2000:]
        yield process, port, secret
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def _get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status


async def _slow_request(port: int, closed: list[bool]) -> None:
    """A slowloris: a request line, then a header line every second, never the end;
    `closed` gets True if the server hangs up on it."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        while True:
            try:
                if not await asyncio.wait_for(reader.read(100), 1):
                    closed.append(True)
                    return
            except TimeoutError:
                pass
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
    except OSError:
        closed.append(True)
    finally:
        writer.close()


async def _flood_one(pid: int, port: int, flood: list[asyncio.Task[None]], closed: list[bool]) -> bool:
    """One more slow request; False if the server neither took nor refused it in 2 s."""
    held, turned_away = _open_fds(pid), len(closed)
    flood.append(asyncio.create_task(_slow_request(port, closed)))
    try:
        await wait_until(lambda: _open_fds(pid) > held or len(closed) > turned_away, timeout=2,
                         what="the endpoint to take the connection")
    except AssertionError:
        return False
    return True


async def test_slow_requests_flooding_the_metrics_port_cannot_starve_smtp_of_descriptors(tmp_path):
    """Anyone who reaches the metrics port opens many connections and trickles a request
    on each. The relay's descriptors are budgeted for SMTP ([server] max_connections,
    LimitNOFILE): the metrics port must not take them, so mail keeps flowing."""
    metrics = free_port()
    async with Sink() as sink, relay_with_fd_limit(
            tmp_path, sink, 140, f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n') as (process, port, secret):
        closed: list[bool] = []
        flood: list[asyncio.Task[None]] = []
        try:
            # one at a time, each until the endpoint took it (a descriptor more) or turned
            # it away; one it can do neither with (no descriptor left to accept it) ends it
            for _ in range(200):
                if not await _flood_one(process.pid, metrics, flood, closed):
                    break
            session = await asyncio.wait_for(logged_in(port, tmp_path, secret), 10)
            await session.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
            await sink.wait_for(1)
            await session.quit()
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
        # the flood gone, a scrape is answered again
        await wait_until(lambda: _answers(metrics), timeout=15, what="/healthz")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _answers(port: int) -> bool:
    try:
        return _get(port, "/healthz") == 200
    except OSError:
        return False


async def test_a_metrics_client_that_resets_leaves_json_log_lines_only(tmp_path):
    """The HTTP server's own error report (a traceback printed to stderr) would put raw
    lines into a JSON log; the relay logs it as one of its records instead."""
    async with Sink() as sink:
        port, metrics = free_port(), free_port()
        config, _ = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
        config.write_text(config.read_text()
                          + f'\n[log]\nformat = "json"\n\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
        process = await start_relay_process(config, port, log_level="DEBUG")
        log = tmp_path / "relay.log"
        try:
            with socket.create_connection(("127.0.0.1", metrics), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            await wait_until(lambda: "metrics endpoint: request from" in log.read_text()
                             or "Traceback" in log.read_text(), what="the server's report")
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0
        for line in log.read_text().splitlines():
            assert isinstance(json.loads(line), dict), line


async def _never(arg: str) -> None:
    await asyncio.Event().wait()  # a provider that never answers QUIT


class _QuitHangingSink(Sink):
    def _protocol(self, loop) -> CountingSMTP:
        protocol = super()._protocol(loop)
        protocol._smtp_methods["QUIT"] = _never  # aiosmtpd's table of command methods
        return protocol


async def test_a_reload_does_not_wait_on_each_pooled_connection_of_a_provider_that_hangs_at_quit(tmp_path):
    """Five pooled connections to a provider that never answers QUIT: the reload that
    retires them (and a SIGTERM queued behind it) must not wait 2 s for each in turn."""
    async with _QuitHangingSink() as sink, running_relay(tmp_path, sink) as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        release = asyncio.Event()

        async def hold() -> None:
            await release.wait()

        sink.handler.before_data_reply = hold
        clients = [await h.login("alice@example.com", secret) for _ in range(5)]
        await asyncio.gather(*(c.sendmail("alice@example.com", [f"r{n}@example.net"], MESSAGE)
                               for n, c in enumerate(clients)))
        await wait_until(lambda: sink.handler.attempts == 5, what="five deliveries at once")
        release.set()
        await sink.wait_for(5)
        courier = h.relay.couriers["sink"]
        await wait_until(lambda: len(courier._idle) == 5, what="five pooled connections")
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await h.relay.reload()
        assert loop.time() - began < 4  # one QUIT timeout (2 s), not five in a row
        for client in clients:
            await client.quit()


async def test_a_sighup_storm_leaves_the_relay_serving_and_sigterm_still_stops_it(tmp_path):
    """A script gone wrong sends SIGHUP in a loop: every reload is applied or refused
    whole, sessions carry on, and the SIGTERM after it stops the relay with exit 0."""
    async with service(tmp_path) as relay:
        await wait_until(lambda: "relay ready" in relay.log, what="the start")
        session = await logged_in(relay.port, tmp_path, relay.secret)
        for _ in range(300):
            os.kill(relay.process.pid, signal.SIGHUP)
        await relay.still_sending(session)
        assert "reload refused" not in relay.log and "Traceback" not in relay.log


async def test_a_reload_that_fixes_a_down_provider_is_tried_at_the_next_delivery(relay_with):
    """The provider moved: it fails, provider health marks it down for an hour. The
    operator fixes its port and reloads; the next message must go out through it, not
    wait out the hour with "is down"."""
    moved = free_port()  # nothing listens here
    provider = f'\n[[upstream]]\nname = "esp"\nhost = "127.0.0.1"\nport = {moved}\ntls = "none"\n'
    async with Sink() as fixed, relay_with(upstream_extra=provider, retry='["1h"]',
                                           health='down_after = 1\nbackoff = "1h"\nmax_backoff = "1h"') as h:
        await h.mailbox("alice@example.com")
        client = await h.login("alice@example.com", await h.key("alice@example.com", route="esp"))
        await client.sendmail("alice@example.com", ["first@example.net"], MESSAGE)
        await wait_until(lambda: not _state(h, "esp").up, what="the provider marked down")

        text = h.config_path.read_text()
        h.config_path.write_text(text.replace(f"port = {moved}", f"port = {fixed.port}"))
        assert await h.relay.reload()
        await client.sendmail("alice@example.com", ["second@example.net"], MESSAGE)
        await fixed.wait_for(1)
        assert [m.rcpt_tos for m in fixed.messages] == [["second@example.net"]]
        assert _state(h, "esp").up
        await client.quit()


def _state(h, name: str):
    return next(s for s in h.relay.health.snapshot() if s.name == name)


def _status(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "status"],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("damage", [
    {"providers": [{"name": "x"}]},
    {"sessions": "many"},
    {"started_at": "yesterday"},
    {"deliveries": {"5m": ["x"]}},
    {"pid": 10**30},
    {"written_at": "NaN"},
    {"interval": "Infinity"},
])
async def test_relay_status_with_a_damaged_state_file_says_so(relay_with, tmp_path, damage):
    """A state file of this version whose content is not what the relay writes (damaged,
    or written by something else): `relay status` says it cannot use it and shows the
    rest, instead of a traceback."""
    async with relay_with() as h:
        await wait_until(lambda: (tmp_path / "relay-state.json").exists(), what="the state file")
        left = json.loads((tmp_path / "relay-state.json").read_text())
    doc = left | {"pid": os.getpid(), "written_at": time.time()} | damage
    (tmp_path / "relay-state.json").write_text(json.dumps(doc).replace('"NaN"', "NaN")
                                               .replace('"Infinity"', "Infinity"))
    result = await asyncio.to_thread(_status, h.config_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("relay:        NOT RUNNING: provider health, deliveries and sessions "
                                    "are unavailable (")
    assert "not a state file this version understands" in result.stdout.splitlines()[0]
    assert "queue:        0 message(s), 0 held" in result.stdout


async def test_a_reload_refuses_max_connections_the_relay_has_no_descriptors_for(relay_with):
    """The start refuses a max_connections its file descriptor limit cannot serve (it would
    fail with "Too many open files" at the busiest moment); a reload must refuse it too."""
    async with relay_with(server="max_connections = 100") as h:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        too_many = (hard if hard != resource.RLIM_INFINITY else 2**20) // 2 + 1000
        text = h.config_path.read_text()
        h.config_path.write_text(text.replace("max_connections = 100", f"max_connections = {too_many}"))
        assert await h.relay.reload() is False
        assert h.relay.config.server.max_connections == 100
        assert h.relay.registry.limit == 100


def _check_config(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("spool", ["not a database", "a folder", "the keystore", "a newer spool"])
async def test_check_config_refuses_a_spool_the_start_would_refuse(tmp_path, spool):
    """`relay check-config` passing and then the (re)start exiting 2 on the spool leaves
    the relay down (the unit does not restart on exit 2): what the start refuses, the
    check must name."""
    config = write_config(tmp_path, 2525)
    text = config.read_text()
    if spool == "the keystore":  # a slip in [queue] path
        config.write_text(text.replace('path = "spool.db"', 'path = "keystore.db"'))
    assert keystore_cli(config, "init").returncode == 0
    path = tmp_path / "spool.db"
    if spool == "not a database":
        path.write_bytes(b"these are not the bytes of a spool\n" * 200)
    elif spool == "a folder":
        path.mkdir()
    elif spool == "a newer spool":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA user_version = 999")
    checked = await asyncio.to_thread(_check_config, config)
    started = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "relay", "--config", str(config),
                                                       "serve"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 2, started.stderr  # what the start says
    assert checked.returncode == 1, checked.stderr
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "[queue] path: " in problems[0], checked.stderr


async def test_check_config_passes_the_spool_of_a_running_relay_and_leaves_it_alone(relay_with, tmp_path):
    async with relay_with() as h:
        await h.mailbox("alice@example.com")
        client = await h.login("alice@example.com", await h.key("alice@example.com"))
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await h.sink.wait_for(1)
        before = (tmp_path / "spool.db").stat().st_mtime_ns
        checked = await asyncio.to_thread(_check_config, h.config_path)
        assert "[queue]" not in checked.stderr, checked.stderr
        assert (tmp_path / "spool.db").stat().st_mtime_ns == before
        await client.sendmail("alice@example.com", ["carol@example.net"], MESSAGE)  # still its spool
        await h.sink.wait_for(2)
        await client.quit()
    checked = await asyncio.to_thread(_check_config, h.config_path)
    assert "[queue]" not in checked.stderr, checked.stderr


async def test_the_watchdog_pings_carry_a_status_line_systemd_can_show(tmp_path):
    """`systemctl status relay` shows the last STATUS=: the periodic ones must say the
    sessions and queue depth, like the one sent with READY=1."""
    async with Sink() as sink:
        port = free_port()
        config, secret = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
        async with NotifySocket() as notify:
            process = await start_relay_process(config, port, env={
                "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""})
            try:
                session = await logged_in(port, tmp_path, secret)
                await wait_until(lambda: any(m.get("STATUS", "").startswith("1 session(s)")
                                             for m in notify.having("WATCHDOG"))
                                 or len(notify.having("WATCHDOG")) > 5, what="a ping during the session")
                statuses = {m["STATUS"] for m in notify.having("WATCHDOG")}
                line = re.compile(r"\d+ session\(s\), \d+ message\(s\) queued")
                assert all(line.fullmatch(s) for s in statuses), statuses
                await session.quit()
            finally:
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 15) == 0
        assert "never awaited" not in (tmp_path / "relay.log").read_text()


@pytest.mark.parametrize("setting", [
    ("[provider_health]", 'max_backoff = "0.2s"', "max_backoff = inf"),
    ("[queue] retry_schedule", "retry_schedule = [\"0.3s\"]", 'retry_schedule = ["' + "9" * 400 + 's"]'),
])
def test_an_infinite_duration_is_a_config_problem(tmp_path, setting):
    """`inf` (TOML) or a number too long for a float: a backoff or retry that never ends
    (mail never retried, "next probe in infd", `Infinity` in a JSON log line, which is
    no JSON). Refused by check-config, and so by the start and a reload."""
    where, old, new = setting
    config = write_config(tmp_path, 2525)
    assert keystore_cli(config, "init").returncode == 0
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))
    checked = _check_config(config)
    assert checked.returncode == 1
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and where in problems[0] and "finite" in problems[0], checked.stderr


@pytest.mark.parametrize("address", [
    ('submission = ["127.0.0.1:0"]', 'submission = ["192.0.2.99:2587"]', "[server] listener"),
    (None, '\n[metrics]\nlisten = "999.1.1.1:9587"\n', "[metrics] listen"),
])
def test_check_config_names_a_listen_address_the_relay_cannot_listen_on(tmp_path, address):
    """An address not on this machine, or a name that does not resolve: the start fails
    on it, and a reload only says the change waits for a restart, which then fails."""
    old, new, where = address
    config = write_config(tmp_path, 2525)
    assert keystore_cli(config, "init").returncode == 0
    text = config.read_text()
    assert old is None or old in text
    config.write_text(text + new if old is None else text.replace(old, new, 1))
    started = subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "serve"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0, started.stderr
    checked = _check_config(config)
    assert checked.returncode == 1, checked.stderr
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and where in problems[0] and "cannot listen" in problems[0], checked.stderr


async def test_scrapes_that_gave_up_leave_no_queue_count_behind_on_the_spool_reader(tmp_path):
    """A scrape waits at most a second for the spool's reader thread (the one the relay's
    deliveries read with). One that gave up must not leave its count queued there: during
    a backlog (a big spool, a slow disk) scrapes every second would pile up counts ahead
    of every read the relay needs."""
    store = await SqliteQueueStore.open(tmp_path / "spool.db", relay=True)
    try:
        counted: list[str] = []
        busy, release = threading.Event(), threading.Event()

        def hold(_conn=None) -> None:
            busy.set()
            release.wait(10)

        def watch() -> None:
            store._rconn.set_trace_callback(
                lambda sql: counted.append(sql) if sql.startswith("SELECT count(*), coalesce") else None)

        store._reader.submit(watch).result(5)
        store._reader.submit(hold)
        assert busy.wait(5)
        for _ in range(20):  # twenty scrapes while the reader is busy: each gives up
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(store.depth_now, 0.01)
        release.set()
        assert await store.count() == 0  # the relay's next read
        assert counted == []  # nothing left behind to run before it
    finally:
        await store.close()
