"""RelaySMTP: aiosmtpd's SMTP protocol with the relay's listener rules.

* every reply passes through `replies.enhance`, so aiosmtpd's bare replies carry RFC 3463
  codes;
* caps on connections, all together and per client address (relay/smtpd/connections.py):
  over one, 421 4.7.0 and close;
* before AUTH succeeds a session has a shorter idle timeout (`[server] pre_auth_timeout`)
  and a budget of PRE_AUTH_COMMANDS commands (NOOP/RSET/EHLO loops end with 421 4.7.0);
  a STARTTLS handshake has HANDSHAKE_TIMEOUT;
* `MAIL FROM:<>` gets our policy reply instead of aiosmtpd's syntax error;
* DATA is read by relay/smtpd/data.py (in chunks, to memory or disk), and the handler's
  `handle_DATA` finds the message as `envelope.body`, a `MessageBody`.
"""

from __future__ import annotations

import asyncio
import binascii
import re
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import AnyStr

from aiosmtpd.smtp import MISSING, SMTP

from relay import internals, replies
from relay.smtpd.connections import HANDSHAKE_TIMEOUT, ConnectionRegistry, Slot
from relay.smtpd.data import DataLimits, MemoryBudget, read_data

__all__ = ["AuthLineTooLong", "ConnectionRegistry", "RelaySMTP"]

_NULL_SENDER = re.compile(r"^FROM:\s*<>", re.IGNORECASE)
# Commands a session may send before AUTH succeeds. A client needs 4 (EHLO, STARTTLS,
# EHLO, AUTH) and a few more for retries; a loop of NOOP or RSET is holding a slot.
PRE_AUTH_COMMANDS = 20


class AuthLineTooLong(Exception):
    """A client's answer to a 334 prompt was longer than the stream's line limit; the
    whole line has been read and dropped. The mechanism answers 500 5.5.6 (RFC 4954)."""


class RelaySMTP(SMTP):
    def __init__(
        self, handler, *, registry: ConnectionRegistry, data_limits: DataLimits, memory: MemoryBudget,
        pre_auth_timeout: float, **kwargs,
    ) -> None:
        super().__init__(handler, data_size_limit=data_limits.message, **kwargs)
        self._registry = registry
        self._data_limits = data_limits
        self._memory = memory
        self._refused = False
        self._slot: Slot | None = None
        self._idle_timeout = float(kwargs.get("timeout", 300))
        self._pre_auth_timeout = pre_auth_timeout
        self._pre_auth_commands = 0
        internals.wrap_commands(self, self._command_rules)

    @property
    def started(self) -> bool:
        """connection_made has run (on 465: the TLS handshake is done)."""
        return self.session is not None

    def adopt_slot(self, slot: Slot) -> None:
        """The implicit-TLS listener took this connection's slot at TCP accept."""
        self._slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = internals.first_connection_made(self)
        if first and self._slot is None:
            peer = transport.get_extra_info("peername")
            refusal = self._registry.refusal(peer)
            if refusal is not None:
                self._refused = True
                transport.write(f"{refusal}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._slot = self._registry.take(peer)
        if first:
            self._registry.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
        if self._refused or self.session is None:  # never started (refused, or TLS failed)
            return
        self._registry.live.discard(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused or self.session is None:  # aiosmtpd's own handler would assert
            return False
        super().eof_received()
        # aiosmtpd has just cancelled the session's task, but asks to keep a plain
        # transport open: a client whose FIN came before the greeting (a port probe) then
        # held its slot until the idle timer. Nothing more can happen here: close.
        return False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd restarts its idle timer with this (at connect and every command): the
        timeout depends on whether the session has authenticated."""
        if duration is None:
            authenticated = self.session is not None and self.session.authenticated
            duration = self._idle_timeout if authenticated else self._pre_auth_timeout
        super()._reset_timeout(duration)

    async def _command_rules(self, command: str, run: Callable[[], Awaitable[None]]) -> None:
        """Around every recognised command: the pre-AUTH budget, the STARTTLS handshake's
        timeout, and the idle timeout once AUTH succeeds."""
        assert self.session is not None and self.transport is not None
        authenticated = self.session.authenticated
        if not authenticated and command != "QUIT":
            self._pre_auth_commands += 1
            if self._pre_auth_commands > PRE_AUTH_COMMANDS:
                await self.push(replies.TOO_MANY_COMMANDS)
                self.transport.close()
                return
        if command == "STARTTLS":
            self._reset_timeout(HANDSHAKE_TIMEOUT)
        await run()
        if self.transport is None:
            return
        if command == "STARTTLS" and self.transport.is_closing():
            # The idle timer closed a handshake in progress: asyncio then finishes
            # STARTTLS as if it had worked and never reports the loss; end the session.
            self.connection_lost(None)
        elif not authenticated and self.session.authenticated:
            self._reset_timeout()  # from now on the (longer) idle timeout

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = replies.enhance(status)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser minus the typing.Protocol class it defines on every
        call (a class creation per MAIL and RCPT: several percent of the relay's CPU)."""
        if not arg:
            return "", ""
        try:
            if arg.lstrip().startswith("<"):
                address, rest = get_angle_addr(arg)
            else:
                address, rest = get_addr_spec(arg)
        except HeaderParseError:
            return None, None
        return address.addr_spec, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and _NULL_SENDER.match(arg) and self.session and self.session.host_name:
            reply = replies.NULL_SENDER if self.session.authenticated else replies.AUTH_REQUIRED
            await self.push(reply)
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA command with our reading (see relay/smtpd/data.py)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            result = await read_data(self._reader, self._data_limits, self._memory, self._reset_timeout)
        except asyncio.IncompleteReadError:  # the client closed mid-message: nothing to answer
            self._set_post_data_state()
            if self.transport is not None:
                self.transport.close()
            return
        if result.body is None:
            self._set_post_data_state()
            await self.push(result.reply or replies.SPOOL_ERROR)
            if result.hang_up and self.transport is not None:
                self.transport.close()
            return
        envelope = self.envelope
        envelope.body = result.body  # type: ignore[attr-defined]
        try:
            status = await self.event_handler.handle_DATA(self, self.session, envelope)
        finally:
            result.body.close()
            self._set_post_data_state()
        await self.push(status)

    # ------------------------------------------------------------------ AUTH

    async def smtp_AUTH(self, arg: str) -> None:
        """Mechanism names are case-insensitive (RFC 4954 section 4 via RFC 4422); aiosmtpd
        matches them exactly, so `AUTH plain` got 504."""
        if arg:
            mechanism, space, rest = arg.lstrip().partition(" ")
            arg = mechanism.upper() + space + rest
        await super().smtp_AUTH(arg)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False,
    ) -> object:
        """aiosmtpd's 334 prompt and answer, except for an answer longer than the stream's
        limit: aiosmtpd's readline() raised ValueError (451 with a traceback, and the rest
        of the line was then read as commands); here the line is read to its end and
        dropped, and AuthLineTooLong raised. The answer is never logged."""
        if isinstance(challenge, str):
            challenge = challenge.encode()
        await self.push(b"334 " + (b64encode(challenge) if encode_to_b64 else challenge))
        blob = (await self._auth_line()).strip()
        if blob == b"*":
            await self.push(replies.AUTH_ABORTED)
            return MISSING
        try:
            return b64decode(blob, validate=True)
        except binascii.Error:
            await self.push(replies.AUTH_BAD_BASE64)
            return MISSING

    async def _auth_line(self) -> bytes:
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial  # the client went away mid-line: what readline() gave
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed
        while True:  # drop the line in limit-sized pieces, as aiosmtpd does a long command
            await reader.readexactly(consumed)
            try:
                await reader.readuntil(b"\n")
                break
            except asyncio.IncompleteReadError:
                break
            except asyncio.LimitOverrunError as exc:
                consumed = exc.consumed
        raise AuthLineTooLong

    @property
    def tls_info(self) -> str | None:
        """"TLSv1.3 TLS_AES_256_GCM_SHA384" for the session's TLS, or None if plaintext."""
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()

    def close_now(self, reply: str | None = None) -> None:
        """Used at shutdown: say goodbye (if idle) and drop the connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply:
            try:
                transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError, OSError):
                pass  # the TLS layer is already gone; just close
        transport.close()
