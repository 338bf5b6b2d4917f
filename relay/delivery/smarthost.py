"""Delivery to an `[[upstream]]` smarthost with aiosmtplib, over reused connections.

Opening a TCP (and TLS) connection per message would cost more than the message, so
connections are kept in a small pool and reused: a finished transaction leaves the
session clean, and a broken one is dropped. A pooled connection the provider has
silently closed is noticed at MAIL FROM, before anything was sent, and the message
goes out on a fresh connection instead of waiting for the next retry.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

import aiosmtplib

from relay.config import UpstreamConfig
from relay.delivery.courier import Outcome
from relay.delivery.errors import session_trouble
from relay.delivery.transaction import SenderRefused, transaction

if TYPE_CHECKING:
    from relay.queue.model import Body

__all__ = ["SmarthostCourier"]


class SmarthostCourier:
    def __init__(self, upstream: UpstreamConfig, *, local_hostname: str) -> None:
        self.name = upstream.name
        self.max_connections = upstream.max_connections
        self._upstream = upstream
        self._local_hostname = local_hostname
        self._password = _read_password(upstream)
        self._idle: list[aiosmtplib.SMTP] = []
        self._closed = False  # a reload replaced this courier: finish what runs, pool nothing
        self._slots = asyncio.Semaphore(upstream.max_connections)

    def _client(self) -> aiosmtplib.SMTP:
        up = self._upstream
        context = None
        if up.tls != "none":
            context = ssl.create_default_context(cafile=str(up.ca_file) if up.ca_file else None)
        return aiosmtplib.SMTP(
            hostname=up.host,
            port=up.effective_port,
            local_hostname=self._local_hostname,
            timeout=up.timeout,
            use_tls=up.tls == "implicit",
            start_tls=up.tls == "starttls",
            tls_context=context,
            username=up.username,
            password=self._password,
        )

    async def deliver(self, mail_from: str, recipients: list[str], body: Body) -> dict[str, Outcome]:
        async with self._slots:
            pooled = self._pooled()
            while True:
                client = pooled or self._client()
                if pooled is None:
                    try:
                        await client.connect()  # greeting, EHLO, STARTTLS, AUTH
                    except Exception as exc:  # noqa: BLE001 - the provider's fault, not the mail's
                        client.close()
                        return dict.fromkeys(recipients, session_trouble(self.name, exc))
                try:
                    result = await transaction(client, self.name, mail_from, recipients, body)
                except SenderRefused as refused:
                    if refused.connection_lost and pooled is not None:
                        pooled = None  # a stale pooled connection: nothing was sent; a fresh one
                        continue
                    await self._keep(client, client.is_connected)
                    return dict.fromkeys(recipients, refused.outcome)
                await self._keep(client, result.reusable)
                return result.outcomes

    async def _keep(self, client: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and not self._closed:
            self._idle.append(client)
        elif reusable:
            await _quit(client)
        else:
            client.close()

    def _pooled(self) -> aiosmtplib.SMTP | None:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        return None

    async def close(self) -> None:
        """QUIT the idle connections; deliveries still running finish, and then QUIT theirs."""
        self._closed = True
        idle, self._idle = self._idle, []
        # at once: a provider that never answers QUIT costs one timeout, not one per connection
        await asyncio.gather(*(_quit(client) for client in idle))


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 2)
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        client.close()


def _read_password(upstream: UpstreamConfig) -> str | None:
    if upstream.password_file is None:
        return None
    return upstream.password_file.read_text(encoding="utf-8").strip()
