"""An SMTP client at the byte level: for tests that must see exactly what the relay
writes, including what comes after the client library would have given up (a reply
written just before the relay closes the connection)."""

from __future__ import annotations

import asyncio
import base64
import ssl


class RawSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def logged_in(cls, port: int, tls: ssl.SSLContext, username: str, secret: str) -> RawSession:
        """Greeting, EHLO, STARTTLS, EHLO and AUTH PLAIN done."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session.reply()
        await session.say(b"EHLO client.test")
        assert (await session.say(b"STARTTLS")).startswith(b"220")
        await writer.start_tls(tls)
        await session.say(b"EHLO client.test")
        plain = base64.b64encode(b"\0" + username.encode() + b"\0" + secret.encode())
        assert (await session.say(b"AUTH PLAIN " + plain)).startswith(b"235")
        return session

    async def reply(self, timeout: float = 5.0) -> bytes:
        """The last line of the next (possibly multi-line) reply."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if line[3:4] != b"-":
                return line

    async def say(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def rest(self, timeout: float = 5.0) -> bytes:
        """Everything the relay writes until it closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()
