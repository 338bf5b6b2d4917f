"""Connections a hostile client can hold (issue 9, item 1): a cap per client address, a
short leash before AUTH (timeout and command budget), TLS handshakes counted from accept
and cut at 10 s, and a file-descriptor limit checked at start.

A second client address is 127.0.0.2: Linux routes all of 127/8 to the loopback."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from relay import replies
from relay.smtpd.connections import HANDSHAKE_TIMEOUT, address_key
from relay.smtpd.server import PRE_AUTH_COMMANDS
from tests.support.procs import free_port, prepare_relay_folder
from tests.support.waiting import wait_until

ALICE = "alice@example.com"
OTHER = "127.0.0.2"
FROM_ADDRESS = f"{replies.TOO_MANY_FROM_ADDRESS}\r\n".encode()
GLOBAL = f"{replies.TOO_MANY_CONNECTIONS}\r\n".encode()
GREETING = b"220 relay.test keyrelay ESMTP\r\n"


class Raw:
    """A bare client socket: what a scanner holds. `greeting()` reads the first line.
    Every one is closed after the test (the `_close_raw_sockets` fixture)."""

    opened: list[Raw] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        Raw.opened.append(self)

    @classmethod
    async def open(cls, port: int, *, source: str = "127.0.0.1", **tls) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), **tls)
        return cls(reader, writer)

    async def greeting(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), 5)

    async def command(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await asyncio.wait_for(self.reader.readline(), 5)

    async def reply(self, line: bytes) -> bytes:
        """The last line of the reply to `line` (multi-line replies are skipped through)."""
        reply = await self.command(line)
        while reply[3:4] == b"-":
            reply = await asyncio.wait_for(self.reader.readline(), 5)
        return reply

    async def closed_by_relay(self, within: float) -> bool:
        """True once the relay closes the connection (EOF or reset), False if it stays open."""
        try:
            while await asyncio.wait_for(self.reader.read(4096), within):
                pass
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            pass
        return True

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError, OSError):
            pass


async def sessions(port: int, count: int, **kwargs) -> tuple[list[Raw], list[bytes]]:
    opened = [await Raw.open(port, **kwargs) for _ in range(count)]
    return opened, [await raw.greeting() for raw in opened]


async def counted(h, count: int) -> None:
    """Wait (up to 2 s) until the relay counts `count` connections: its accept and its
    close run on its loop, after our side saw them. The assertions that follow judge."""
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: h.relay.registry.count == count, timeout=2)


async def send_from(h, source: str) -> str:
    """A whole submission from `source`: STARTTLS, AUTH, one message; the queue reply."""
    await h.mailbox(ALICE)
    secret = await h.key(ALICE)
    client = await h.login(ALICE, secret, source=source)
    _, reply = await client.sendmail(ALICE, ["bob@example.net"], b"From: alice@example.com\r\n\r\nhi\r\n")
    await client.quit()
    return reply


# ------------------------------------------------------------------ per-address cap


async def test_idle_connections_from_one_address_leave_room_for_others(relay_with):
    """The issue's case: as many idle sockets from one address as max_connections used to
    give every other client 421; now that address gets its share (the default
    max_connections_per_address, 50) and no more."""
    async with relay_with(server="max_connections = 60") as h:
        idle, greetings = await sessions(h.port, 60)
        assert greetings == [GREETING] * 50 + [FROM_ADDRESS] * 10
        for refused in idle[50:]:
            assert await refused.closed_by_relay(within=5)
        assert (await send_from(h, OTHER)).startswith("2.0.0 OK queued as ")
        (message,) = await h.sink.wait_for(1)
        assert message.rcpt_tos == ["bob@example.net"]
        # a slot given back is free again for that address
        idle[0].close()
        deadline = time.monotonic() + 5
        while True:
            again = await Raw.open(h.port)
            if (line := await again.greeting()) == GREETING or time.monotonic() > deadline:
                break
            again.close()
            await asyncio.sleep(0.05)
        assert line == GREETING
        for raw in (*idle, again):
            raw.close()


async def test_the_address_cap_spans_both_listeners_and_says_so_inside_tls(relay_with):
    async with relay_with(server="max_connections_per_address = 2") as h:
        # one session, and a 465 connection that never sends its ClientHello
        assert await (await Raw.open(h.port)).greeting() == GREETING
        await Raw.open(h.implicit_port)
        await counted(h, 2)
        assert await (await Raw.open(h.port)).greeting() == FROM_ADDRESS
        # 465: the client only understands a reply inside TLS, so it gets one there
        implicit = await Raw.open(h.implicit_port, ssl=h.tls, server_hostname="relay.test")
        assert await implicit.greeting() == FROM_ADDRESS
        assert await implicit.closed_by_relay(within=5)
        # another address is not affected, on either listener
        other = await Raw.open(h.implicit_port, source=OTHER, ssl=h.tls, server_hostname="relay.test")
        assert await other.greeting() == GREETING
        other.close()


def test_ipv6_clients_are_counted_per_64():
    """A host picks any address of its /64, so a /128 count would cap nothing."""
    one = address_key(("2001:db8:1:2::5", 587, 0, 0))
    assert one == address_key(("2001:db8:1:2:ffff:ffff:ffff:ffff", 587, 0, 0)) == "2001:db8:1:2::/64"
    assert one != address_key(("2001:db8:1:3::5", 587, 0, 0))
    assert address_key(("192.0.2.7", 587)) != address_key(("192.0.2.8", 587))
    assert address_key(("::ffff:192.0.2.7", 587, 0, 0)) == address_key(("192.0.2.7", 587)) == "192.0.2.7"


@pytest.mark.parametrize("setting", ["max_connections_per_address = 0", 'pre_auth_timeout = "0s"'])
def test_zero_is_no_way_to_turn_a_connection_limit_off(tmp_path, setting):
    from relay.config import ConfigError, load_config
    from tests.support.relayrun import write_config

    with pytest.raises(ConfigError, match=f"\\[server\\] {setting.split()[0]}: must be more than 0"):
        load_config(write_config(tmp_path, 2525, server=setting))


# ------------------------------------------------------------------ before AUTH


async def test_a_session_that_does_not_log_in_is_closed_after_pre_auth_timeout(relay_with):
    async with relay_with(server='pre_auth_timeout = "1s"') as h:
        await h.mailbox(ALICE)
        secret = await h.key(ALICE)
        logged_in = await h.login(ALICE, secret)  # its last command: AUTH
        started = time.monotonic()
        lingering = await Raw.open(h.port)
        assert await lingering.greeting() == GREETING
        assert await lingering.command(b"EHLO scanner") == b"250-relay.test\r\n"
        assert await lingering.closed_by_relay(within=5)
        assert 0.9 < time.monotonic() - started < 3
        # idle for longer than pre_auth_timeout too, but logged in: the idle timeout applies
        response = await logged_in.noop()
        assert (response.code, response.message) == (250, "2.0.0 OK")
        await logged_in.quit()


async def test_noop_loops_before_auth_end_with_421_but_not_after(h):
    looping = await Raw.open(h.port)
    assert await looping.greeting() == GREETING
    for number in range(PRE_AUTH_COMMANDS):
        verb = (b"EHLO x", b"NOOP", b"RSET", b"HELP")[number % 4]
        assert (await looping.reply(verb)).startswith(b"250 "), verb
    assert await looping.reply(b"NOOP") == b"421 4.7.0 Too many commands before authentication\r\n"
    assert await looping.closed_by_relay(within=5)

    await h.mailbox(ALICE)
    pooled = await h.login(ALICE, await h.key(ALICE))
    for _ in range(3 * PRE_AUTH_COMMANDS):
        response = await pooled.rset()
        assert response.code == 250
    await pooled.quit()


# ------------------------------------------------------------------ TLS handshakes


async def test_handshakes_in_progress_count_against_the_global_cap(relay_with):
    async with relay_with(server="max_connections = 3") as h:
        # two 465 connections that never send a ClientHello, and one session
        for _ in range(2):
            await Raw.open(h.implicit_port)
        await counted(h, 2)
        assert await (await Raw.open(h.port, source=OTHER)).greeting() == GREETING
        assert await (await Raw.open(h.port, source="127.0.0.3")).greeting() == GLOBAL


async def test_stalled_tls_handshakes_are_cut_at_10_seconds_and_free_their_slots(relay_with):
    """A scanner that connects to 465 and sends nothing, or says STARTTLS on 587 and
    then nothing, held its socket for 30 s (465) or 60 s (STARTTLS)."""
    async with relay_with(server="max_connections = 2") as h:
        started = time.monotonic()
        implicit = await Raw.open(h.implicit_port)
        await counted(h, 1)
        starttls = await Raw.open(h.port)
        assert await starttls.greeting() == GREETING
        assert await starttls.command(b"EHLO scanner") == b"250-relay.test\r\n"
        while not (await starttls.reader.readline()).startswith(b"250 "):
            pass
        assert await starttls.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        assert await (await Raw.open(h.port, source=OTHER)).greeting() == GLOBAL

        closed = await asyncio.gather(implicit.closed_by_relay(within=HANDSHAKE_TIMEOUT + 5),
                                      starttls.closed_by_relay(within=HANDSHAKE_TIMEOUT + 5))
        assert closed == [True, True]
        assert HANDSHAKE_TIMEOUT - 1 < time.monotonic() - started < HANDSHAKE_TIMEOUT + 3
        # both slots are free again
        await counted(h, 0)
        assert await (await Raw.open(h.port, source="127.0.0.3")).greeting() == GREETING
        assert (await send_from(h, OTHER)).startswith("2.0.0 OK queued as ")


# ------------------------------------------------------------------ file descriptors


def _limit_nofile(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


async def _relay_with_fd_limit(tmp_path: Path, soft: int, hard: int) -> asyncio.subprocess.Process:
    port = free_port()
    config, _ = await prepare_relay_folder(tmp_path, free_port(), port, '["1s"]')
    with open(tmp_path / "relay.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "--config", str(config), "serve",
            stdout=asyncio.subprocess.DEVNULL, stderr=log, preexec_fn=_limit_nofile(soft, hard),
        )
    proc.port = port  # type: ignore[attr-defined]
    return proc


async def test_a_max_connections_the_file_limit_cannot_serve_is_a_config_error(tmp_path):
    """A soft and hard limit of 256 against the default max_connections = 1000."""
    proc = await _relay_with_fd_limit(tmp_path, 256, 256)
    try:
        assert await asyncio.wait_for(proc.wait(), 20) == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (tmp_path / "relay.log").read_text()
    assert "[server] max_connections = 1000 needs about" in log
    assert "may open only 256 (hard limit 256)" in log
    assert "LimitNOFILE=" in log


async def test_the_soft_file_limit_is_raised_to_the_hard_one(tmp_path):
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 8192)
    proc = await _relay_with_fd_limit(tmp_path, 256, hard)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.returncode is None, (tmp_path / "relay.log").read_text()
            try:
                raw = await Raw.open(proc.port)  # type: ignore[attr-defined]
                break
            except OSError:
                assert time.monotonic() < deadline, "the relay did not start listening"
                await asyncio.sleep(0.05)
        assert await raw.greeting() == GREETING
        raw.close()
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        (line,) = [entry for entry in limits if entry.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture(autouse=True)
async def _close_raw_sockets():
    yield
    opened, Raw.opened[:] = list(Raw.opened), []
    for raw in opened:
        await raw.wait_closed()


@pytest.fixture(autouse=True)
def _second_loopback_address():
    """127.0.0.2 must be usable as a source address (Linux: all of 127/8 is loopback)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((OTHER, 0))
        except OSError:
            pytest.skip(f"{OTHER} is not a local address here")



async def test_a_half_closed_connection_gives_its_slot_back(relay_with):
    """A client that shuts its side (FIN) can send no more commands: the session is over
    and its slot free, not held until the idle timer."""
    async with relay_with(server="max_connections = 1") as h:
        for wait_for_greeting in (True, False):
            if wait_for_greeting:
                leaving = await Raw.open(h.port)
                assert await leaving.greeting() == GREETING
                leaving.writer.write_eof()
            else:  # a port probe: its FIN is there before the relay has even accepted
                probe = socket.create_connection(("127.0.0.1", h.port))
                probe.shutdown(socket.SHUT_WR)
                leaving = Raw(*await asyncio.open_connection(sock=probe))
            assert await leaving.closed_by_relay(within=2)
            await counted(h, 0)
            staying = await Raw.open(h.port)
            assert await staying.greeting() == GREETING
            await staying.wait_closed()
            await counted(h, 0)
