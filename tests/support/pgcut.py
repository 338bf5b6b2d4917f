"""A TCP relay between the relay and a real PostgreSQL that can lose the server's answer to
one commit, as a network fault or a server killed at the wrong instant would: the
transaction is committed, the client never hears so (the window every `COMMIT` has).

Only the bytes of the wire protocol are looked at, never changed: a connection whose
client sent `marker` (a statement's text) has its link cut when the server's
CommandComplete for COMMIT comes back, before it is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["PgCut", "pg_cut"]

_COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete, tag "COMMIT"


@dataclass
class PgCut:
    port: int = 0
    marker: bytes | None = None  # armed: cut the next connection sending this at its COMMIT
    refuse: bool = False  # the database is unreachable: new connections are closed at once
    down_after_cut: bool = False  # at the cut, the database becomes unreachable (refuse, every link)
    cuts: int = 0  # answers lost so far
    _links: set[asyncio.StreamWriter] = field(default_factory=set)

    def url(self, pg_url: str) -> str:
        """`pg_url` (a database on the test server) through this relay."""
        scheme, rest = pg_url.split("://", 1)
        user, hostport_db = rest.split("@", 1)
        database = hostport_db.split("/", 1)[1]
        return f"{scheme}://{user}@127.0.0.1:{self.port}/{database}"

    def drop_all(self) -> None:
        """Every open link broken at once (the server restarted, the network failed)."""
        for writer in list(self._links):
            writer.close()


@contextlib.asynccontextmanager
async def pg_cut(server_port: int) -> AsyncIterator[PgCut]:
    cut = PgCut()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if cut.refuse:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", server_port)
        except OSError:
            client_w.close()
            return
        cut._links.update((client_w, server_w))
        doomed = False

        async def upstream() -> None:
            nonlocal doomed
            while data := await client_r.read(65536):
                if cut.marker is not None and cut.marker in data:
                    cut.marker, doomed = None, True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            nonlocal doomed
            while data := await server_r.read(65536):
                if doomed and _COMMIT_DONE in data:
                    doomed = False
                    cut.cuts += 1
                    if cut.down_after_cut:
                        cut.refuse, cut.down_after_cut = True, False
                        cut.drop_all()
                    return  # the server committed; its answer goes nowhere
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_w, server_w):
                cut._links.discard(writer)
                writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    cut.port = listener.sockets[0].getsockname()[1]
    try:
        yield cut
    finally:
        cut.drop_all()
        listener.close()
        await listener.wait_closed()
