"""systemd's notify protocol (sd_notify(3)): one datagram of `KEY=value` lines to the unix
socket named by $NOTIFY_SOCKET.

A few lines of ours rather than a library: the protocol is one `sendto`, and the parts
that matter are ours anyway (when READY=1 is true, what STATUS= says, that WATCHDOG=1
comes from the event loop itself so a wedged loop stops the pings and systemd restarts
the relay). Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

__all__ = ["Notifier"]

log = logging.getLogger("relay")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        """Best effort: a notify socket that went away must not take the relay with it."""
        if self._address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) tell this reload from another
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    async def keep_alive(self, status: Callable[[], Awaitable[str]], every: float = 5.0) -> None:
        """WATCHDOG=1 at half the watchdog interval (when systemd asked for one) and a
        fresh STATUS= line (`await status()`: it may count the queue); runs until cancelled.
        It runs on the event loop, so its pings stop exactly when the loop stops answering."""
        if self._address is None:
            return
        interval = min(every, self.watchdog_interval / 2) if self.watchdog_interval else every
        while True:
            lines = [f"STATUS={await status()}"]
            if self.watchdog_interval:
                lines.append("WATCHDOG=1")
            self.send(*lines)
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds from $WATCHDOG_USEC, if it is meant for this process ($WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000
