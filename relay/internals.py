"""Every place the relay reaches into a library's private names, in one module.

aiosmtpd, aiosmtplib and asyncio give no public way to do a few things the relay must
do; each is a small function here, named for what it does, so a library upgrade breaks
one file and tests/test_internals.py fails loudly naming the attribute that moved. pyproject.toml
bounds the versions these were checked against.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from email import _header_value_parser

import aiosmtplib
from aiosmtpd.smtp import SMTP
from aiosmtplib.response import SMTPResponse

__all__ = [
    "REQUIRED", "buffered", "data_in_chunks", "first_connection_made", "reader_limit",
    "start_server_tls", "wrap_commands",
]

# (object description, attribute) pairs the functions below rely on; the test checks them.
REQUIRED = [
    ("asyncio.StreamReader instance", "_limit"),
    # the bytearray of what the stream holds and has not handed out (buffered() peeks at it)
    ("asyncio.StreamReader instance", "_buffer"),
    # RelaySMTP overrides this method (aiosmtpd calls it at connect and before every
    # command) to pick the idle timeout by auth state; its signature is (duration=None).
    ("aiosmtpd.smtp.SMTP", "_reset_timeout"),
    ("aiosmtpd.smtp.SMTP instance", "_smtp_methods"),
    ("aiosmtpd.smtp.SMTP instance", "_original_transport"),
    # asyncio's TLS protocol (a module outside asyncio's public API; aiosmtpd's STARTTLS
    # uses it the same way), called as (loop, app_protocol, sslcontext, waiter,
    # server_side=, ssl_handshake_timeout=).
    ("asyncio.sslproto", "SSLProtocol"),
    # session_reader, reset_envelope: DATA and AUTH answers are read by the relay itself
    ("aiosmtpd.smtp.SMTP session", "_reader"),
    ("aiosmtpd.smtp.SMTP", "_set_post_data_state"),
    # parse_path: the stdlib's RFC 5322 parser, as aiosmtpd's own _getaddr uses it
    ("email._header_value_parser", "get_addr_spec"),
    ("email._header_value_parser", "get_angle_addr"),
    # limit_tls_read_buffer
    ("asyncio.sslproto.SSLProtocol", "max_size"),
    # data_in_chunks: aiosmtplib's DATA, fed a chunk at a time
    ("aiosmtplib.protocol.SMTPProtocol instance", "_command_lock"),
    ("aiosmtplib.protocol.SMTPProtocol instance", "_response_pending"),
    ("aiosmtplib.protocol.SMTPProtocol instance", "_drain_helper"),
]


@contextlib.contextmanager
def reader_limit(reader: asyncio.StreamReader, limit: int) -> Iterator[None]:
    """Raise the stream's buffer limit for a while (the DATA phase).

    aiosmtpd creates its StreamReader with limit = 1001 bytes, the longest command line;
    at that size a message is read in 1 KB pieces and the transport paused every 2 KB.
    The limit is also what `readuntil()` may buffer before it gives up on a separator, so
    it bounds the memory a session holds per read.
    """
    before = reader._limit  # type: ignore[attr-defined]
    reader._limit = limit  # type: ignore[attr-defined]
    try:
        yield
    finally:
        reader._limit = before  # type: ignore[attr-defined]


def buffered(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes the stream holds and has not handed out, left in it (a peek).

    StreamReader has none. DATA needs one where the end-of-data marker may have begun in
    bytes already read (relay/smtpd/data.py): only a look at what follows tells how far
    it may read at once without reading past the marker into the client's next command.
    """
    return bytes(reader._buffer[:limit])  # type: ignore[attr-defined]


def detach_input(server: SMTP) -> None:
    """Stop the session from reading anything more the client sent: after a goodbye,
    commands the client pipelined must not be read. aiosmtpd's loop reads whatever is
    buffered without suspending, so the session's cancellation would land too late (and
    on a closed TLS transport a read that resumes the paused stream raises). The loop is
    given a new, empty stream that nothing feeds: its next read suspends, and there the
    cancellation ends it. What the transport still delivers goes to the old one."""
    server._reader = asyncio.StreamReader()  # type: ignore[attr-defined]


def first_connection_made(server: SMTP) -> bool:
    """True at a session's first `connection_made`, False at the one after STARTTLS.

    aiosmtpd calls `connection_made` again with the TLS transport after STARTTLS and
    tells the two apart by its `_original_transport` (the plain one, kept to close it).
    """
    return server._original_transport is None and server.transport is None  # type: ignore[attr-defined]


def wrap_commands(
    server: SMTP, rules: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]],
) -> None:
    """Run every recognised command of `server` as `await rules(COMMAND, run)`.

    aiosmtpd dispatches through the `_smtp_methods` table it fills in `__init__` (after
    the idle timer is restarted, before the command runs) and has no per-command hook;
    `rules` decides whether `run()` happens at all. Unrecognised commands never get here
    (aiosmtpd's own budget of 5 ends those). The table is replaced by a view that wraps a
    method when it is looked up: wrapping all twenty at connect cost every idle session
    about 14 KiB.
    """
    server._smtp_methods = _RuledTable(server._smtp_methods, rules)  # type: ignore[attr-defined]


class _RuledTable(Mapping[str, Callable[[str | None], Awaitable[None]]]):
    __slots__ = ("_methods", "_rules")

    def __init__(self, methods: dict[str, Callable[[str | None], Awaitable[None]]],
                 rules: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]) -> None:
        self._methods = methods
        self._rules = rules

    def __getitem__(self, command: str) -> _Ruled:
        return _Ruled(command, self._methods[command], self._rules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)


class _Ruled:
    """One command's method under the rules; its other attributes (the @syntax text HELP
    reads) are the method's."""

    __slots__ = ("_command", "_method", "_rules")

    def __init__(self, command: str, method: Callable[[str | None], Awaitable[None]],
                 rules: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]) -> None:
        self._command, self._method, self._rules = command, method, rules

    async def __call__(self, arg: str | None) -> None:
        await self._rules(self._command, lambda: self._method(arg))

    def __getattr__(self, name: str) -> object:
        return getattr(self._method, name)


def start_server_tls(
    transport: asyncio.BaseTransport, app: asyncio.BaseProtocol, context: ssl.SSLContext, *,
    handshake_timeout: float,
) -> asyncio.Future[None]:
    """Put TLS (server side) between `transport` and `app` now, inside `connection_made`.

    `app.connection_made` gets the TLS transport once the handshake is done; the returned
    future is then done, or fails if the handshake does (or is done without `app` having
    been told, when the client left). `loop.start_tls` is the public way, but it is a
    coroutine: under uvloop the transport starts reading as soon as `connection_made`
    returns, so the ClientHello reached the old protocol before start_tls ran and the
    handshake hung. Swapping the protocol synchronously has no such window.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    tls = asyncio.sslproto.SSLProtocol(
        loop, app, context, waiter, server_side=True, ssl_handshake_timeout=handshake_timeout,
    )
    transport.set_protocol(tls)
    tls.connection_made(transport)
    return waiter


async def data_in_chunks(
    client: aiosmtplib.SMTP, chunks: AsyncIterator[bytes], *, timeout: float | None,
) -> SMTPResponse:
    """aiosmtplib's DATA (`SMTPProtocol.execute_data_command`), fed a chunk at a time.

    aiosmtplib takes the message as one bytes object and makes three copies of it (line
    endings, dot-stuffing, the final dot) on the event loop: 4x a 25 MiB message, and
    about 100 ms during which no other session is served. Here each chunk is dot-stuffed
    alone and written once the transport has room. The message's lines must already end
    in CRLF (the relay refuses anything else at DATA). Raises what aiosmtplib's data()
    raises: SMTPDataError for a refusal, SMTPServerDisconnected / SMTPTimeoutError.
    """
    protocol = client.protocol
    if protocol is None or protocol._command_lock is None:  # type: ignore[attr-defined]
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    try:
        async with protocol._command_lock:  # type: ignore[attr-defined]
            protocol._response_pending = True  # type: ignore[attr-defined]
            protocol.write(b"DATA\r\n")
            start = await protocol.read_response(timeout=timeout)
            if start.code != aiosmtplib.SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol._response_pending = True  # type: ignore[attr-defined]
            tail = b"\r\n"  # the DATA line's end: the message starts at a line start
            async for chunk in chunks:
                if not chunk:
                    continue
                # a line-leading dot may sit just after the previous chunk's CRLF (or CR)
                stuffed = (tail + chunk).replace(b"\r\n.", b"\r\n..")[len(tail):]
                tail = chunk[-2:] if len(chunk) >= 2 else (tail + chunk)[-2:]
                protocol.write(stuffed)
                try:
                    await asyncio.wait_for(protocol._drain_helper(), timeout)  # type: ignore[attr-defined]
                except TimeoutError:
                    raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None
            protocol.write(b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n")
            response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
        client.close()
        raise
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def session_reader(server: SMTP) -> asyncio.StreamReader:
    """The session's stream: DATA (relay/smtpd/data.py) and AUTH answers are read from it
    by the relay, not by aiosmtpd's line-at-a-time helpers."""
    return server._reader  # type: ignore[attr-defined]


def reset_envelope(server: SMTP) -> None:
    """A fresh envelope after DATA, as aiosmtpd's own DATA leaves the session."""
    server._set_post_data_state()  # type: ignore[attr-defined]


def parse_path(arg: str) -> tuple[str, str]:
    """A MAIL/RCPT argument's address and what follows it, by the email package's RFC 5322
    parser (the one aiosmtpd uses); raises on what it cannot parse, and not only
    HeaderParseError (a lone double quote raises IndexError)."""
    if arg.lstrip().startswith("<"):
        address, rest = _header_value_parser.get_angle_addr(arg)
    else:
        address, rest = _header_value_parser.get_addr_spec(arg)
    return address.addr_spec, rest


def limit_tls_read_buffer(size: int) -> None:
    """asyncio's TLS protocol reads up to 256 KiB per session; records are at most 16 KiB."""
    asyncio.sslproto.SSLProtocol.max_size = size  # type: ignore[attr-defined]
