"""Upstreams too broken for aiosmtpd to play: one that refuses at the greeting, and one
that accepts the connection and then never says anything (hung)."""

from __future__ import annotations

import asyncio


class RawServer:
    """`async with RawServer(greeting=b"554 ...") as s:` → s.port, s.connections.

    greeting None: a hung server (reads and never answers)."""

    def __init__(self, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.greeting is not None:
            writer.write(self.greeting + b"\r\n")
            await writer.drain()
        try:
            while await reader.read(4096):
                if self.greeting is not None:  # RFC 5321 3.1: after a 554 greeting, 503 to all
                    writer.write(b"503 5.5.1 no service\r\n")
        except ConnectionError:
            pass

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()
