"""A real SMTP server (aiosmtpd) standing in for an upstream provider in tests.

It records what it accepts and can be told to answer 4xx or 5xx, so tests see what a
provider would do without mocking SMTP.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, AuthResult


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass
class SinkHandler:
    """Replies may be bytes: a provider that answers with bytes that are not UTF-8."""

    messages: list[Received] = field(default_factory=list)
    data_reply: str | bytes | None = None  # e.g. "451 4.3.0 try later" or "554 5.7.1 rejected"
    rcpt_replies: dict[str, str | bytes] = field(default_factory=dict)
    mail_reply: str | bytes | None = None  # e.g. "550 5.7.1 account suspended"
    mail_reply_once: str | None = None  # answered to the next MAIL only (e.g. a 421 and a close)
    # awaited in DATA before the reply: hold the relay there, or fill its disk meanwhile
    before_data_reply: Callable[[], Awaitable[None]] | None = None
    connections: int = 0
    disconnections: int = 0
    attempts: int = 0
    require_auth: bool = False
    last_envelope: object = None

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.mail_reply_once:
            reply, self.mail_reply_once = self.mail_reply_once, None
            if reply.startswith("421"):  # RFC 5321 3.8: the reply, then the server closes
                asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        self.last_envelope = envelope
        if self.before_data_reply is not None:
            await self.before_data_reply()
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 accepted"


class CountingSMTP(SMTP):
    def __init__(self, handler: SinkHandler, **kwargs):
        super().__init__(handler, **kwargs)
        self._sink_handler = handler

    def connection_made(self, transport):
        if self.transport is None:
            self._sink_handler.connections += 1
        super().connection_made(transport)

    def connection_lost(self, error):
        self._sink_handler.disconnections += 1
        super().connection_lost(error)


class Sink:
    """`async with Sink() as sink:` → sink.port, sink.messages, await sink.wait_for(n).

    With `tls` it offers STARTTLS (or speaks TLS from the start if `implicit`); with
    `credentials=(user, password)` it requires AUTH before MAIL, as a provider does.
    """

    def __init__(self, port: int = 0, *, tls: ssl.SSLContext | None = None, implicit: bool = False,
                 credentials: tuple[str, str] | None = None) -> None:
        self.handler = SinkHandler()
        self._port = port
        self._tls = tls
        self._implicit = implicit
        self.credentials = credentials
        self.logins: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        ok = self.credentials == (auth_data.login.decode(), auth_data.password.decode())
        if not ok:
            return AuthResult(success=False, handled=False)  # aiosmtpd then answers 535
        self.logins.append(auth_data.login.decode())
        return AuthResult(success=True)

    def _protocol(self, loop) -> CountingSMTP:
        options: dict = {"hostname": "sink.test", "loop": loop}
        if self._tls is not None and not self._implicit:
            options["tls_context"] = self._tls
            options["require_starttls"] = True
        if self.credentials is not None:
            # aiosmtpd warns on auth_required without auth_require_tls (its implicit-TLS
            # blind spot), so on implicit TLS the handler enforces AUTH before MAIL itself
            options.update(authenticator=self._authenticator, auth_required=not self._implicit,
                           auth_require_tls=not self._implicit)
            self.handler.require_auth = True
        return CountingSMTP(self.handler, **options)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: self._protocol(loop), "127.0.0.1", self._port,
            ssl=self._tls if self._implicit else None,
        )
        return self

    async def start_on(self, port: int) -> Sink:
        """Come back up on the same port (an upstream that was down)."""
        self._port = port
        return await self.start()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"sink got {len(self.messages)} message(s), expected {count}")
            await asyncio.sleep(0.02)
        return self.messages
