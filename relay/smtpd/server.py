"""RelaySMTP: aiosmtpd's SMTP protocol with the relay's listener rules.

* every reply passes through `replies.enhance`, so aiosmtpd's bare replies carry RFC 3463
  codes;
* caps on connections, all together and per client address (relay/smtpd/connections.py):
  over one, 421 4.7.0 and close;
* before AUTH succeeds a session has a shorter idle timeout (`[server] pre_auth_timeout`)
  and a budget of PRE_AUTH_COMMANDS commands (NOOP/RSET/EHLO loops end with 421 4.7.0);
  a STARTTLS handshake has HANDSHAKE_TIMEOUT;
* on a listener behind a load balancer, the PROXY v2 header's source is the client
  (`accept_proxy`, relay/smtpd/proxy.py), kept across STARTTLS; on implicit TLS the
  acceptor reads the header and hands the client over (`adopt_slot`);
* `MAIL FROM:<>` gets our policy reply instead of aiosmtpd's syntax error;
* DATA is read by relay/smtpd/data.py (in chunks, to memory or disk), and the handler's
  `handle_DATA` finds the message as `envelope.body`, a `MessageBody`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Callable
from typing import AnyStr

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from relay import internals, maillog, replies
from relay.metrics import data_refusal_reason, handshake_failure
from relay.smtpd.connections import HANDSHAKE_TIMEOUT, ConnectionRegistry, Slot, local_port
from relay.smtpd.data import DataLimits, MemoryBudget, read_data
from relay.smtpd.proxy import ProxyPolicy

__all__ = ["AuthLineTooLong", "ConnectionRegistry", "RelaySMTP"]

log = logging.getLogger("relay.smtpd")

_NULL_SENDER = re.compile(r"^FROM:\s*<>", re.IGNORECASE)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# aiosmtpd's own goodbyes (5 unknown commands; a command over its command_call_limit)
_AIOSMTPD_GOODBYE = re.compile(
    r"502 5\.5\.1 Too many unrecognized commands|421 4\.7\.0 \S+ sent too many times")
# Commands a session may send before AUTH succeeds. A client needs 4 (EHLO, STARTTLS,
# EHLO, AUTH) and a few more for retries; a loop of NOOP or RSET is holding a slot.
PRE_AUTH_COMMANDS = 20


class AuthLineTooLong(Exception):
    """A client's answer to a 334 prompt was longer than the stream's line limit; the
    whole line has been read and dropped. The mechanism answers 500 5.5.6 (RFC 4954)."""


class RelaySMTP(SMTP):
    def __init__(
        self, handler, *, registry: ConnectionRegistry, data_limits: DataLimits, memory: MemoryBudget,
        pre_auth_timeout: float, proxy: ProxyPolicy | None = None, **kwargs,
    ) -> None:
        if proxy is not None:  # aiosmtpd reads the PROXY header before the greeting
            kwargs["proxy_protocol_timeout"] = HANDSHAKE_TIMEOUT
        super().__init__(handler, data_size_limit=data_limits.message, **kwargs)
        self._proxy = proxy
        self._proxied = False  # a valid PROXY header named the client
        self._client: tuple[str, int] | None = None  # ... this one
        self._port: int | None = None
        self._registry = registry
        self._data_limits = data_limits
        self._memory = memory
        self._refused = False
        self._slot: Slot | None = None
        self._idle_timeout = float(kwargs.get("timeout", 300))
        self._pre_auth_timeout = pre_auth_timeout
        self._pre_auth_commands = 0
        self.log_session: maillog.SessionLog | None = None  # once the session starts
        internals.wrap_commands(self, self._command_rules)

    @property
    def started(self) -> bool:
        """connection_made has run (on 465: the TLS handshake is done)."""
        return self.session is not None

    def adopt_slot(self, slot: Slot, client: tuple[str, int] | None = None) -> None:
        """The implicit-TLS listener took this connection's slot at TCP accept; behind a
        load balancer it has also read the PROXY header, which named `client` (the
        session's peer from the start: aiosmtpd expects no header here)."""
        self._slot = slot
        self._client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = internals.first_connection_made(self)
        if first and self._slot is None:
            peer = transport.get_extra_info("peername")
            if self._proxy is not None and not self._proxy.allows(peer):
                self._refused = True  # not a load balancer: no greeting at all
                self._registry.metrics.connection_refused("not_a_proxy")
                maillog.proxy_refused(peer, local_port(transport), "not_a_proxy")
                transport.close()
                return
            # behind a load balancer the per-address cap counts the client, after the header
            refusal = self._registry.refusal(peer, per_address=self._proxy is None)
            if refusal is not None:
                self._refused = True
                maillog.refused(peer, local_port(transport), "submission", refusal)
                transport.write(f"{refusal}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                return
            self._slot = self._registry.take(peer)
        if first:
            self._registry.live.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # TLS is up: from the start on 465, else after STARTTLS
            self._registry.metrics.tls_handshake("submissions" if first else "submission", "ok",
                                                 ssl_object.version())
        super().connection_made(transport)
        if self._client is not None:  # aiosmtpd's (new, after STARTTLS) session has the balancer's address
            assert self.session is not None
            self.session.peer = self._client
        self._log_start(transport, first)

    def _log_start(self, transport: asyncio.BaseTransport, first: bool) -> None:
        """The `connect` line when the session starts (on 465: after the handshake) and
        the `tls` line once TLS is up (at once on 465, after STARTTLS on 587)."""
        ssl_object = transport.get_extra_info("ssl_object")
        if first:
            self._port = local_port(transport)
        if first and self._proxy is None:
            peer = self._client if self._client is not None else transport.get_extra_info("peername")
            self.log_session = maillog.SessionLog(
                maillog.client_address(peer), local_port(transport),
                "submission" if ssl_object is None else "submissions")
            maillog.connected(self.log_session)
        if ssl_object is not None and self.log_session is not None:
            cipher = ssl_object.cipher()
            maillog.tls_established(self.log_session, ssl_object.version(), cipher[0] if cipher else None)

    def connection_lost(self, error: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
        if self._refused or self.session is None:  # never started (refused, or TLS failed)
            return
        self._registry.live.discard(self)
        if self.log_session is not None:
            maillog.disconnected(self.log_session)
        elif self._proxy is not None and not self._proxied:  # missing, malformed or not v2
            self._registry.metrics.connection_refused("proxy_header")
            maillog.proxy_refused(self.session.peer, self._port, "proxy_header")
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused or self.session is None:  # aiosmtpd's own handler would assert
            return False
        super().eof_received()
        # aiosmtpd has just cancelled the session's task, but asks to keep a plain
        # transport open: a client whose FIN came before the greeting (a port probe) then
        # held its slot until the idle timer. Nothing more can happen here: close.
        return False

    def accept_proxy(self, data: ProxyData) -> bool:
        """The PROXY header read on a proxied listener (the handler's handle_PROXY): with a
        v2 PROXY command its source address becomes the session's client (log, AUTH
        throttle, allow-from, last-used address, Received:), counted by the per-address
        cap from now on. False closes the connection without a greeting."""
        client = ProxyPolicy.client(data)
        if client is None or self.session is None or self.transport is None or self._slot is None:
            return False
        refusal = self._registry.refusal(client, total=False)
        if refusal is not None:
            self._proxied = True  # logged here, not as a bad header
            maillog.refused(client, self._port, "submission", refusal)
            self.transport.write(f"{refusal}\r\n".encode())  # type: ignore[attr-defined]
            return False
        self._registry.move(self._slot, client)
        self.session.peer = self._client = client
        self._proxied = True
        self.log_session = maillog.SessionLog(maillog.client_address(client), self._port, "submission")
        maillog.connected(self.log_session)
        return True

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
        if self.transport.is_closing():  # after a goodbye (ours or aiosmtpd's own 502/421)
            await self.hang_up("")  # the client's pipelined commands are neither run nor answered
            return
        authenticated = self.session.authenticated
        if not authenticated and command != "QUIT":
            self._pre_auth_commands += 1
            if self._pre_auth_commands > PRE_AUTH_COMMANDS:
                self._registry.metrics.connection_refused("pre_auth_commands")
                await self.hang_up(replies.TOO_MANY_COMMANDS)
                return
        if command == "STARTTLS":
            self._reset_timeout(HANDSHAKE_TIMEOUT)
        began = self.loop.time() if command == "STARTTLS" else 0.0
        await run()
        if self.transport is None:
            return
        if command == "STARTTLS" and self.transport.is_closing():
            # The idle timer closed a handshake in progress: asyncio then finishes
            # STARTTLS as if it had worked and never reports the loss; end the session.
            # (The same happens when the client leaves mid-handshake.)
            timed_out = self.loop.time() - began > HANDSHAKE_TIMEOUT - 0.5
            self._registry.metrics.tls_handshake("submission", "timeout" if timed_out else "dropped")
            self.connection_lost(None)
        elif not authenticated and self.session.authenticated:
            self._reset_timeout()  # from now on the (longer) idle timeout

    async def push(self, status: AnyStr) -> None:
        """Every reply: with an enhanced code, printable ASCII only and at most 512 octets
        with its CRLF (RFC 5321 4.5.3.1.5): aiosmtpd echoes an unknown command word back
        as it came, NUL, CR or terminal escapes included. Nothing is written once the
        connection is closing (pipelined commands after a goodbye get no answers)."""
        if self.log_session is not None:  # the greeting comes first: from then on, what
            maillog.enter(self.log_session)  # this task logs is about this session
        if self.transport is None or self.transport.is_closing():
            return
        if isinstance(status, str):
            status = _UNPRINTABLE.sub("?", replies.enhance(status))[:510]
        await super().push(status)
        if isinstance(status, str) and _AIOSMTPD_GOODBYE.match(status):
            await self.hang_up("")  # aiosmtpd closes, then would read on: end it here

    async def hang_up(self, reply: str) -> None:
        """Say goodbye (unless `reply` is empty) and end the session now: commands the
        client already pipelined are neither run nor answered (the session's task is
        cancelled)."""
        if reply:
            await self.push(reply)
        internals.detach_input(self)
        if self.transport is not None:
            self.transport.close()
        task = asyncio.current_task()
        if task is not None:
            task.cancel()

    async def handle_exception(self, error: Exception) -> str:
        """A client that says STARTTLS and then no TLS (a scanner, a client without TLS) is
        its fault, not ours: logged without a traceback (aiosmtpd then closes)."""
        if isinstance(error, TLSSetupException):
            maillog.tls_failed(self.log_session, self.session and self.session.peer,
                               self.log_session and self.log_session.port, "submission", error.__cause__)
            self._registry.metrics.tls_handshake("submission", handshake_failure(error.__cause__))
            return replies.TLS_FAILED
        return await super().handle_exception(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser minus the typing.Protocol class it defines on every
        call (a class creation per MAIL and RCPT: several percent of the relay's CPU)."""
        if not arg:
            return "", ""
        try:
            return internals.parse_path(arg)
        except Exception:  # noqa: BLE001 - malformed: a syntax error, whatever the parser raised
            return None, None

    async def smtp_STARTTLS(self, arg: str) -> None:
        """RFC 3207: no TLS inside TLS (aiosmtpd would answer a second STARTTLS with 220 and
        nest a handshake in the session's TLS); on 465 the session is TLS from the start."""
        if self.tls_info is not None:
            await self.push(replies.TLS_ALREADY_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

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
            result = await read_data(internals.session_reader(self), self._data_limits, self._memory,
                                     self._reset_timeout)
        except asyncio.IncompleteReadError:  # the client closed mid-message: nothing to answer
            internals.reset_envelope(self)
            if self.transport is not None:
                self.transport.close()
            return
        if result.body is None:
            internals.reset_envelope(self)
            self._registry.metrics.message_refused(data_refusal_reason(result.reply or replies.SPOOL_ERROR),
                                                   _key_id(self.session))
            if result.hang_up:
                await self.hang_up(result.reply or replies.TOO_BIG)
            else:
                await self.push(result.reply or replies.SPOOL_ERROR)
            return
        envelope = self.envelope
        envelope.body = result.body  # type: ignore[attr-defined]
        try:
            status = await self.event_handler.handle_DATA(self, self.session, envelope)
        finally:
            result.body.close()
            internals.reset_envelope(self)
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
        reader = internals.session_reader(self)
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


def _key_id(session: object) -> str | None:
    """The session's key id, for a key-labelled metric (DATA only follows a good AUTH)."""
    identity = getattr(session, "auth_data", None)
    return getattr(identity, "key_id", None)
