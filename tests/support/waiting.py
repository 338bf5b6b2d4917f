"""Waiting for a condition in a test, never for a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def wait_until(check: Callable[[], object | Awaitable[object]], timeout: float = 5.0,
                     what: str = "condition") -> None:
    """Until `check()` holds, looking every 10 ms; AssertionError naming `what` after
    `timeout` s. `check` may be a coroutine function (one that reads the spool)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)
