"""A hostile SMTP client for the fuzz tests: it sends exactly the bytes it is given, keeps
every byte the relay sends back, and can half-close or reset the TCP connection, also
under TLS (where asyncio has no write_eof).

Also here: the rules a transcript of relay replies must follow, and a log recorder that
collects what a crash or a traceback would leave in the relay's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import struct
from collections.abc import Callable

from relay.maillog import KeyRedactor

__all__ = ["LogRecorder", "RawClient", "reply_problems"]

# RFC 5321 4.2: reply-line = code [ SP / "-" ] textstring, textstring = 1*(%d09 / %d32-126);
# the final line of a reply has a space (we want it even when the text is empty).
_LINE = re.compile(rb"(\d{3})([ -])([\t\x20-\x7e]*)")
# RFC 3463 status-code = class "." subject "." detail
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: |$)")
_MAX_LINE = 512  # RFC 5321 4.5.3.1.5: a reply line, CRLF included


def reply_problems(data: bytes, *, greeting: bool = True, complete: bool = True) -> list[str]:
    """Everything wrong with a transcript of replies; [] if it is well formed.

    `greeting`: the transcript starts with the relay's greeting, which (like replies to
    EHLO/HELO, RFC 2034 section 3) needs no enhanced status code. `complete=False`: the
    client cut the connection itself, so the transcript may stop anywhere.
    """
    problems: list[str] = []
    if not complete:
        data = data[:data.rfind(b"\r\n") + 2]
    if data and not data.endswith(b"\r\n"):
        problems.append(f"transcript does not end with CRLF: ...{data[-80:]!r}")
    lines = data.split(b"\r\n")[:-1] if data.endswith(b"\r\n") else data.split(b"\r\n")
    code_of_reply: bytes | None = None
    reply_index = 0
    goodbye: bytes | None = None
    for line in lines:
        if goodbye is not None:  # RFC 5321 3.8: after 421 (or 221) the server closes
            problems.append(f"reply after {goodbye[:60]!r}: {line[:120]!r}")
            break
        match = _LINE.fullmatch(line)
        if match is None:
            problems.append(f"malformed reply line: {line[:120]!r}")
            code_of_reply = None
            continue
        code, separator, text = match.groups()
        if len(line) + 2 > _MAX_LINE:
            problems.append(f"reply line of {len(line) + 2} octets (over {_MAX_LINE}): {line[:80]!r}...")
        if code_of_reply is not None and code != code_of_reply:
            problems.append(f"reply changes its code mid-way: {line[:120]!r}")
        is_greeting = greeting and reply_index == 0
        if code[:1] in (b"4", b"5") and not is_greeting:
            enhanced = _ENHANCED.match(text.decode("ascii"))
            if enhanced is None or enhanced.group(1) != code[:1].decode():
                problems.append(f"{code.decode()} reply without a matching enhanced code: {line[:120]!r}")
        if separator == b"-":
            code_of_reply = code
        else:
            code_of_reply = None
            reply_index += 1
            if code in (b"221", b"421"):
                goodbye = line
    if code_of_reply is not None and complete:
        problems.append("transcript ends inside a multi-line reply")
    return problems


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply, read before the reader task starts (greeting, EHLO, STARTTLS)."""
    data = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            raise ConnectionError(f"relay closed the connection after {data!r}")
        data += line
        if line[3:4] != b"-":
            return data


class RawClient:
    """One connection to the relay. Every byte received is kept in `received` by a reader
    task, so the relay's replies are checked whatever state the session got into."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, preamble: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.received = bytearray(preamble)
        self.closed_by_relay = asyncio.Event()
        self.read_error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read_all())

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None, starttls: bool = False,
                      source: str | None = None, greeting: bool = True) -> RawClient:
        """tls=None: plaintext on the STARTTLS port; starttls: EHLO + STARTTLS first, then TLS;
        otherwise TLS from the first byte (the implicit TLS port). greeting=False: read
        nothing first (plaintext sent to the implicit TLS port gets no greeting)."""
        local = (source, 0) if source else None
        implicit = tls is not None and not starttls
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=local, ssl=tls if implicit else None,
            server_hostname="relay.test" if implicit else None), 5)
        preamble = await _reply(reader) if greeting else b""
        if starttls and preamble.startswith(b"220 "):  # not refused (421) at the greeting
            assert tls is not None
            for command in (b"EHLO client.example\r\n", b"STARTTLS\r\n"):
                writer.write(command)
                last = await _reply(reader)
                preamble += last
            if not last.startswith(b"220 "):
                raise ConnectionError(f"STARTTLS refused: {preamble!r}")
            await asyncio.wait_for(writer.start_tls(tls, server_hostname="relay.test"), 5)
        return cls(reader, writer, preamble)

    async def until(self, done: Callable[[bytes], bool], timeout: float) -> bool:
        """Wait until `done(everything received)` or the relay closes; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done(bytes(self.received)):
            if self.closed_by_relay.is_set():
                return False
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    async def _read_all(self) -> None:
        try:
            while chunk := await self.reader.read(65536):
                self.received += chunk
                self._changed.set()
        except (OSError, ssl.SSLError, EOFError) as error:  # a reset, or TLS cut without close_notify
            self.read_error = error
        finally:
            self.closed_by_relay.set()
            self._changed.set()

    async def send(self, data: bytes, timeout: float = 5.0) -> bool:
        """False if the relay has closed the connection (the rest cannot be sent)."""
        if self.closed_by_relay.is_set() or self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), timeout)
        except (OSError, ssl.SSLError, RuntimeError):
            return False
        return True

    def ends_with_final_reply(self) -> bool:
        tail = bytes(self.received[-600:])
        if not tail.endswith(b"\r\n"):
            return False
        last = tail[:-2].rsplit(b"\r\n", 1)[-1]
        return last[3:4] == b" "

    async def settle(self, timeout: float) -> None:
        """Wait until what arrived ends with a whole final reply line, or `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = len(self.received)
        while not self.closed_by_relay.is_set():
            if len(self.received) > seen and self.ends_with_final_reply():
                return
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _raw_socket(self) -> socket.socket | None:
        """A duplicate of the connection's file descriptor: shutdown() and SO_LINGER act on
        the connection itself, below any TLS layer, and closing the duplicate closes nothing."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return None
        try:
            return socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None

    def half_close(self) -> None:
        """shutdown(SHUT_WR): the relay reads end-of-file while we still read its replies."""
        raw = self._raw_socket()
        if raw is None:
            return
        with raw, contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashing client or a middlebox does."""
        raw = self._raw_socket()
        if raw is not None:
            with raw, contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_closed_by_relay(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.closed_by_relay.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.writer.transport.abort()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ssl.SSLError):
            await self._task


class LogRecorder(logging.Handler):
    """Keeps the records a crash leaves: any with exc_info or a traceback in its text, and
    any ERROR or worse. Attached to the relay's, aiosmtpd's and asyncio's loggers at DEBUG
    so nothing is filtered out before it gets here.

    Also watches for secrets: a record the relay's logging would write at debug (the
    root handler's KeyRedactor applied; aiosmtpd's `mail.log` included, as
    relay.logformat shows it at debug) that still holds one of `secrets` is kept as well."""

    LOGGERS = ("relay", "keystore", "mail.log", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.secrets: list[str] = []
        self._saved: dict[str, int] = {}
        self._redactor = KeyRedactor()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if (record.exc_info or record.exc_text or record.stack_info or "Traceback" in message
                or record.levelno >= logging.ERROR or self._leaks(record)):
            self.records.append(record)

    def _leaks(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return False
        written = logging.makeLogRecord(record.__dict__)
        self._redactor.filter(written)
        text = f"{written.getMessage()} {written.exc_text or ''}".lower()
        return any(secret.lower() in text for secret in self.secrets)

    def problems(self) -> list[str]:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return [("SECRET IN LOG: " if self._leaks(record) else "") + formatter.format(record)
                for record in self.records]

    def __enter__(self) -> LogRecorder:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(self._saved[name])
