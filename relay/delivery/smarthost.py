"""Delivery to an `[[upstream]]` smarthost with aiosmtplib, over reused connections.

Opening a TCP (and TLS) connection per message would cost more than the message, so
connections are kept in a small pool and reused: a finished transaction leaves the
session clean (aiosmtplib RSETs after an error), and a broken one is simply dropped.
"""

from __future__ import annotations

import asyncio
import ssl

import aiosmtplib

from relay.config import UpstreamConfig
from relay.delivery.courier import Outcome, Status
from relay.delivery.errors import outcome_for_exception, outcome_for_reply

__all__ = ["SmarthostCourier"]


class SmarthostCourier:
    def __init__(self, upstream: UpstreamConfig, *, local_hostname: str) -> None:
        self.name = upstream.name
        self._upstream = upstream
        self._local_hostname = local_hostname
        self._password = _read_password(upstream)
        self._idle: list[aiosmtplib.SMTP] = []
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

    async def _acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        client = self._client()
        await client.connect()
        return client

    async def deliver(self, mail_from: str, recipients: list[str], body: bytes) -> dict[str, Outcome]:
        async with self._slots:
            client = None
            try:
                client = await self._acquire()
                refused, reply = await client.sendmail(mail_from, recipients, body)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                self._release(client)
                return {err.recipient: outcome_for_reply(err.code, err.message) for err in exc.recipients}
            except ssl.SSLError as exc:  # caught before ValueError: certificate errors are both
                await _discard(client)
                return dict.fromkeys(recipients, outcome_for_exception(exc))
            except (aiosmtplib.SMTPResponseException, ValueError) as exc:
                self._release(client)
                outcome = outcome_for_exception(exc)
                return dict.fromkeys(recipients, outcome)
            except Exception as exc:  # noqa: BLE001 - network faults become deferrals
                await _discard(client)
                return dict.fromkeys(recipients, outcome_for_exception(exc))
            self._release(client)
            outcomes = dict.fromkeys(recipients, Outcome(Status.SENT, f"250 {reply}"))
            for rcpt, response in refused.items():
                outcomes[rcpt] = outcome_for_reply(response.code, response.message)
            return outcomes

    def _release(self, client: aiosmtplib.SMTP | None) -> None:
        if client is not None and client.is_connected:
            self._idle.append(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _discard(client, polite=True)


async def _discard(client: aiosmtplib.SMTP | None, *, polite: bool = False) -> None:
    if client is None or not client.is_connected:
        return
    try:
        if polite:
            await asyncio.wait_for(client.quit(), 2)
        else:
            client.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
        client.close()


def _read_password(upstream: UpstreamConfig) -> str | None:
    if upstream.password_file is None:
        return None
    return upstream.password_file.read_text(encoding="utf-8").strip()
