"""Every place the relay reaches into a library's private names, in one module.

aiosmtpd and asyncio give no public way to do a few things the relay must do; each is a
small function here, named for what it does, so a library upgrade breaks one file and
tests/test_internals.py fails loudly naming the attribute that moved. pyproject.toml
bounds the versions these were checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator

from aiosmtpd.smtp import SMTP

__all__ = ["REQUIRED", "first_connection_made", "reader_limit", "wrap_commands"]

# (object description, attribute) pairs the functions below rely on; the test checks them.
REQUIRED = [
    ("asyncio.StreamReader instance", "_limit"),
    # RelaySMTP overrides this method (aiosmtpd calls it at connect and before every
    # command) to pick the idle timeout by auth state; its signature is (duration=None).
    ("aiosmtpd.smtp.SMTP", "_reset_timeout"),
    ("aiosmtpd.smtp.SMTP instance", "_smtp_methods"),
    ("aiosmtpd.smtp.SMTP instance", "_original_transport"),
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
    (aiosmtpd's own budget of 5 ends those).
    """
    table: dict[str, Callable[[str | None], Awaitable[None]]] = server._smtp_methods  # type: ignore[attr-defined]
    for command, method in list(table.items()):
        table[command] = _ruled(command, method, rules)


def _ruled(
    command: str, method: Callable[[str | None], Awaitable[None]],
    rules: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]],
) -> Callable[[str | None], Awaitable[None]]:
    @functools.wraps(method)  # keeps the @syntax attributes HELP reads
    async def ruled(arg: str | None) -> None:
        await rules(command, lambda: method(arg))
    return ruled
