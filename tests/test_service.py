"""The relay as a systemd service: readiness and watchdog over $NOTIFY_SOCKET, SIGHUP
reload without dropping sessions, SIGTERM that finishes a message in DATA, and a unit
file systemd itself accepts. Real processes, real signals, a real notify socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509

from relay.tlsconf import generate_self_signed
from tests.support.procs import free_port, prepare_relay_folder, start_relay_process
from tests.support.rawclient import RawSession
from tests.support.relayrun import client_tls
from tests.support.sink import Sink
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: alice@example.com\r\nSubject: hello\r\n\r\nbody\r\n"


class NotifySocket:
    """What systemd listens on: an abstract unix datagram socket; keeps every message."""

    def __init__(self) -> None:
        self.name = f"@keyrelay-test-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifySocket:
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def having(self, key: str) -> list[dict[str, str]]:
        return [m for m in self.messages if key in m]


def serial_seen(port: int, folder: Path) -> int:
    """The serial of the certificate a new client is shown on the implicit-TLS port."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def logged_in(port: int, folder: Path, secret: str) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                             tls_context=client_tls(folder), timeout=5)
    await client.connect()
    await client.login("alice@example.com", secret)
    return client


def with_implicit_port(config_path: Path) -> int:
    port = free_port()
    text = config_path.read_text().replace('submissions = ["127.0.0.1:0"]',
                                           f'submissions = ["127.0.0.1:{port}"]')
    config_path.write_text(text)
    return port


@dataclass
class Service:
    """A relay process with a sink, a key for alice@example.com and both listeners on
    fixed ports, as systemd runs it."""

    folder: Path
    sink: Sink
    process: asyncio.subprocess.Process
    config: Path
    port: int
    implicit: int
    secret: str

    @property
    def log(self) -> str:
        return (self.folder / "relay.log").read_text()

    async def still_sending(self, session: aiosmtplib.SMTP) -> None:
        """`session` (opened earlier) and a new one each send a message that arrives."""
        await session.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        fresh = await logged_in(self.port, self.folder, self.secret)
        await fresh.sendmail("alice@example.com", ["carol@example.net"], MESSAGE)
        await self.sink.wait_for(2)
        await session.quit()
        await fresh.quit()


@contextlib.asynccontextmanager
async def service(folder: Path, **options):
    """The relay runs inside; on the way out it gets SIGTERM and must exit 0."""
    async with Sink() as sink:
        port = free_port()
        config, secret = await prepare_relay_folder(folder, sink.port, port, '["1s"]')
        implicit = with_implicit_port(config)
        process = await start_relay_process(config, port, **options)
        try:
            yield Service(folder, sink, process, config, port, implicit, secret)
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 15) == 0


async def test_notify_socket_gets_ready_status_watchdog_reloading_and_stopping(tmp_path):
    sink_port, port = free_port(), free_port()
    config_path, _ = await prepare_relay_folder(tmp_path, sink_port, port, '["1s"]')
    async with NotifySocket() as notify:
        relay = await start_relay_process(config_path, port, env={
            "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": "",
        })
        try:
            await wait_until(lambda: notify.having("READY"), what="READY=1")
            ready = notify.having("READY")[0]
            assert ready["READY"] == "1" and ready["MAINPID"] == str(relay.pid)
            assert ready["STATUS"] == "0 session(s), 0 message(s) queued"
            # WATCHDOG=1 keeps coming at half the interval, from the event loop
            await wait_until(lambda: len(notify.having("WATCHDOG")) >= 3, what="three WATCHDOG=1")
            relay.send_signal(signal.SIGHUP)
            await wait_until(lambda: notify.having("RELOADING"), what="RELOADING=1")
            await wait_until(lambda: len(notify.having("READY")) == 2, what="READY=1 after the reload")
            reloading = notify.having("RELOADING")[0]
            assert int(reloading["MONOTONIC_USEC"]) > 0
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 15) == 0
        finally:
            if relay.returncode is None:
                relay.kill()
                await relay.wait()
        await wait_until(lambda: notify.having("STOPPING"), what="STOPPING=1")
        order = [next(iter(k for k in ("READY", "RELOADING", "STOPPING") if k in m))
                 for m in notify.messages if {"READY", "RELOADING", "STOPPING"} & m.keys()]
        assert order == ["READY", "RELOADING", "READY", "STOPPING"]


async def test_sighup_serves_a_renewed_certificate_and_keeps_open_sessions(tmp_path):
    async with service(tmp_path) as relay:
        first = serial_of(tmp_path / "cert.pem")
        assert serial_seen(relay.implicit, tmp_path) == first
        before = await logged_in(relay.port, tmp_path, relay.secret)  # under the old certificate

        # certbot's deploy hook: new files, then `systemctl reload relay`
        generate_self_signed("relay.test", tmp_path / "cert.pem", tmp_path / "key.pem")
        renewed = serial_of(tmp_path / "cert.pem")
        assert renewed != first
        relay.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "configuration reloaded" in relay.log, what="the reload")

        assert serial_seen(relay.implicit, tmp_path) == renewed
        after = await logged_in(relay.port, tmp_path, relay.secret)  # STARTTLS: the new one too
        assert after.transport.get_extra_info("ssl_object").getpeercert(binary_form=True) == \
            ssl.PEM_cert_to_DER_cert((tmp_path / "cert.pem").read_text())
        # the session opened before the reload is still there and still sends
        await before.sendmail("alice@example.com", ["old@example.net"], MESSAGE)
        await after.sendmail("alice@example.com", ["new@example.net"], MESSAGE)
        await relay.sink.wait_for(2)
        assert sorted(m.rcpt_tos[0] for m in relay.sink.messages) == ["new@example.net", "old@example.net"]
        await before.quit()
        await after.quit()


@pytest.mark.parametrize("breakage", ["not toml", "missing certificate", "unknown upstream"])
async def test_a_broken_config_on_sighup_changes_nothing(tmp_path, breakage):
    async with service(tmp_path) as relay:
        good = relay.config.read_text()
        serial = serial_of(tmp_path / "cert.pem")
        session = await logged_in(relay.port, tmp_path, relay.secret)
        relay.config.write_text({
            "not toml": good + "\n[server\n",
            "missing certificate": good.replace('cert = "cert.pem"', 'cert = "renewed.pem"'),
            "unknown upstream": good.replace('default = "sink"', 'default = "nowhere"'),
        }[breakage])
        relay.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in relay.log, what="the refusal")
        refusals = [line for line in relay.log.splitlines() if "reload refused" in line]
        assert len(refusals) == 1 and "running configuration stays in force" in refusals[0]
        # the old configuration is in force: same certificate, same upstream, session alive
        assert serial_seen(relay.implicit, tmp_path) == serial
        await relay.still_sending(session)


async def test_sigterm_lets_a_message_in_data_finish_and_refuses_the_rest(tmp_path):
    async with Sink() as sink:
        port = free_port()
        config_path, secret = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
        relay = await start_relay_process(config_path, port)
        try:
            sending = await logged_in(port, tmp_path, secret)
            idle = await logged_in(port, tmp_path, secret)
            await sending.mail("alice@example.com")
            await sending.rcpt("bob@example.net")
            code, _ = await sending.execute_command(b"DATA")
            assert code == 354
            sending.transport.write(b"From: alice@example.com\r\nSubject: in flight\r\n\r\nfirst half\r\n")

            relay.send_signal(signal.SIGTERM)
            # the idle session is told without asking, and new connections find nothing listening
            reply = await idle.protocol.read_response(timeout=10)
            assert (reply.code, reply.message) == (421, "4.3.2 Service shutting down, try again later")
            await wait_until(lambda: _refused(port), what="the listener to close")
            assert relay.returncode is None  # still finishing the message in DATA

            sending.transport.write(b"second half\r\n.\r\n")
            reply = await sending.protocol.read_response(timeout=10)
            assert reply.code == 250 and reply.message.startswith("2.0.0 OK queued as")
            assert await asyncio.wait_for(relay.wait(), 15) == 0
            assert "still in a message" not in (tmp_path / "relay.log").read_text()
        finally:
            if relay.returncode is None:
                relay.kill()
                await relay.wait()
        if not sink.messages:  # stopped before its delivery ran: the next start delivers it
            relay = await start_relay_process(config_path, port)
            await sink.wait_for(1)
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 15) == 0
        assert len(sink.messages) == 1
        assert b"first half\r\nsecond half\r\n" in sink.messages[0].data


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _verify(unit: str, folder: Path, program: str = "relay") -> str:
    """systemd-analyze verify's complaints about `unit` (it exits 0 on unknown keys and bad
    values, and only says so on stderr), with ExecStart's binary present (verify checks)."""
    binary = folder / program
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    path = folder / f"{program}.service"
    path.write_text(unit.replace(f"/opt/keyrelay/.venv/bin/{program}", str(binary)))
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                            timeout=60)
    return f"exit {result.returncode}\n{result.stderr}" if result.returncode else result.stderr.strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    unit = (ROOT / "deploy" / "relay.service").read_text()
    assert _verify(unit, tmp_path) == ""
    # the check would see a typo or a bad value
    assert "Unknown key" in _verify(unit.replace("Type=notify", "Type=notify\nProtectClok=true"), tmp_path)
    for directive in ("Type=notify", "WatchdogSec=", "NotifyAccess=main", "ExecReload=",
                      "SystemCallFilter=@system-service", "ProtectClock=true", "ProtectKernelLogs=true",
                      "RestrictSUIDSGID=true", "RestrictRealtime=true", "ProtectProc=invisible",
                      "LimitNOFILE=65536", "RestartPreventExitStatus=2"):
        assert f"\n{directive}" in unit, directive


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_console_unit(tmp_path):
    unit = (ROOT / "deploy" / "keystore-console.service").read_text()
    assert _verify(unit, tmp_path, "keystore") == ""
    assert "Unknown key" in _verify(unit.replace("Type=exec", "Type=exec\nProtectClok=true"), tmp_path,
                                    "keystore")
    assert "\nExecStart=/opt/keyrelay/.venv/bin/keystore --config /etc/keyrelay/relay.toml serve\n" in unit
    for directive in ("User=keyrelay", "UMask=0077", "ProtectSystem=strict", "NoNewPrivileges=true",
                      "SystemCallFilter=@system-service", "RestartPreventExitStatus=2"):
        assert f"\n{directive}" in unit, directive


async def test_sigterm_does_not_wait_past_the_grace_for_a_stalled_message(tmp_path):
    async with Sink() as sink:
        port = free_port()
        config_path, secret = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
        config_path.write_text(config_path.read_text().replace(
            "rate_per_minute = 0", 'rate_per_minute = 0\nshutdown_grace = "1s"'))
        relay = await start_relay_process(config_path, port)
        try:
            session = await RawSession.logged_in(port, client_tls(tmp_path), "alice@example.com", secret)
            assert (await session.say(b"MAIL FROM:<alice@example.com>")).startswith(b"250")
            assert (await session.say(b"RCPT TO:<bob@example.net>")).startswith(b"250")
            assert (await session.say(b"DATA")).startswith(b"354")
            session.writer.write(b"From: alice@example.com\r\n\r\nand then nothing more")
            loop = asyncio.get_running_loop()
            began = loop.time()
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 15) == 0
            assert loop.time() - began < 8  # the grace (1 s) and the deliveries' few seconds
            said = await session.rest()
            assert said == b"421 4.3.2 Service shutting down, try again later\r\n"  # told, then closed
            session.close()
            log = (tmp_path / "relay.log").read_text()
            assert log.count("still in a message after shutdown_grace") == 1
            assert "1 session(s) still in a message" in log
        finally:
            if relay.returncode is None:
                relay.kill()
                await relay.wait()
        assert sink.messages == []  # never answered 250, so never sent


async def test_sighup_changes_the_log_level(tmp_path):
    async with service(tmp_path, log_level=None) as relay:  # [log] level decides
        await wait_until(lambda: "relay ready" in relay.log, what="the start")
        await logged_in_anonymously(relay.port)
        assert "DEBUG" not in relay.log
        relay.config.write_text(relay.config.read_text() + '\n[log]\nlevel = "debug"\n')
        relay.process.send_signal(signal.SIGHUP)
        await wait_until(lambda: "configuration reloaded" in relay.log, what="the reload")
        await logged_in_anonymously(relay.port)
        await wait_until(lambda: " DEBUG " in relay.log, what="a debug line")


async def logged_in_anonymously(port: int) -> None:
    """A session that says EHLO and QUIT: enough for aiosmtpd's debug lines."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\nQUIT\r\n")
    await reader.read()
    writer.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="the hook chowns files to the relay's user: root only")
async def test_the_certbot_hook_switches_cert_and_key_together_and_reloads(tmp_path):
    """deploy/certbot-deploy-hook.sh as certbot runs it (RENEWED_LINEAGE, as root), with the
    relay's user root: each renewal is served after the hook, also when check-config
    reports a problem the relay can live with (a greeting name the certificate lacks)."""
    lineage = tmp_path / "letsencrypt"
    lineage.mkdir()
    hook_env = {**os.environ, "RENEWED_LINEAGE": str(lineage), "KEYRELAY_USER": "root",
                "KEYRELAY_TLS_DIR": str(tmp_path / "tls"), "KEYRELAY_CONFIG": str(tmp_path / "relay.toml"),
                "KEYRELAY_BIN": str(Path(sys.executable).with_name("relay")), "KEYRELAY_RELOAD": "true",
                # the console unit's restart (it serves HTTPS with the same certificate)
                "KEYRELAY_CONSOLE_RESTART": f"echo restarted >> {tmp_path / 'console-restarts'}"}

    def renew() -> tuple[int, subprocess.CompletedProcess]:
        generate_self_signed("relay.test", lineage / "fullchain.pem", lineage / "privkey.pem")
        done = subprocess.run(["sh", str(ROOT / "deploy" / "certbot-deploy-hook.sh")], env=hook_env,
                              capture_output=True, text=True, timeout=60)
        return serial_of(lineage / "fullchain.pem"), done

    async with Sink() as sink:
        port = free_port()
        config, _ = await prepare_relay_folder(tmp_path, sink.port, port, '["1s"]')
        implicit = with_implicit_port(config)
        config.write_text(config.read_text()
                          .replace('cert = "cert.pem"', 'cert = "tls/live/fullchain.pem"')
                          .replace('key = "key.pem"', 'key = "tls/live/privkey.pem"')
                          .replace('hostname = "relay.test"', 'hostname = "mx1.internal"'))
        first, done = renew()  # the first certificate, before the relay runs
        assert done.returncode == 0, done.stderr
        relay = await start_relay_process(config, port)
        try:
            assert serial_seen(implicit, tmp_path) == first
            hook_env["KEYRELAY_RELOAD"] = f"kill -HUP {relay.pid}"
            for _ in range(4):
                serial, done = renew()
                assert done.returncode == 0, done.stderr
                assert "mx1.internal" in done.stderr and "reloading anyway" in done.stderr
                await wait_until(lambda serial=serial: serial_seen(implicit, tmp_path) == serial,
                                 what="the renewed certificate served")
            copies = [p for p in (tmp_path / "tls").iterdir() if not p.name.startswith(("live", "."))]
            assert len(copies) == 3  # the newest three kept
            assert (tmp_path / "console-restarts").read_text() == "restarted\n" * 5
            key = tmp_path / "tls" / "live" / "privkey.pem"
            assert oct(key.stat().st_mode & 0o777) == "0o600"
        finally:
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 15) == 0
