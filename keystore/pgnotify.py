"""Key changes pushed to every relay: LISTEN on the PostgreSQL keystore (issue 12).

Several relays share one PostgreSQL keystore. Each caches a session's recheck for
`[auth] recheck_interval`, so a key revoked through one node's CLI would still pass at
another for up to that long. The keystore's triggers (keystore/pgschema.py) `NOTIFY
keyrelay_keys` in the transaction that revokes, disables, rotates, edits or suspends, with
a payload naming what changed ('key:ID', 'mailbox:ADDRESS', 'workspace:NAME', ...); this
listener hands each payload to the relay, which drops what it cached about it, so the
next command of an open session on any node reads the keystore again.

A notification is only delivered to a connection that is listening when it is sent. So
whenever it starts listening (the first time, and after a lost connection), the relay is
told `"*"` (forget everything cached), and the periodic recheck stays as the safety net for the moments
in between. TCP keepalives find a connection whose server vanished without a FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psycopg

from keystore.pg import keepalives, redact, scrub

__all__ = ["CHANNEL", "EVERYTHING", "KeyChanges"]

log = logging.getLogger("keystore.notify")

CHANNEL = "keyrelay_keys"
EVERYTHING = "*"  # the payload handed over after a gap in listening
_RETRY_FIRST, _RETRY_MAX = 0.2, 5.0


class KeyChanges:
    """Listens on CHANNEL while started; `listening` says whether notifications arrive now."""

    def __init__(self, url: str, on_change: Callable[[str], None]) -> None:
        self._url = url
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection | None = None
        self.listening = False
        self._ready = asyncio.Event()

    async def start(self, timeout: float = 10.0) -> None:
        """Begin listening; waits (up to `timeout`) for the first LISTEN so a relay that has
        started is a relay that hears changes. A server that does not answer is not fatal:
        the loop keeps trying and the periodic recheck covers the gap."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="keystore notifications")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.listening = False

    async def _run(self) -> None:
        delay = _RETRY_FIRST
        gap = False  # whether changes may have been missed since the last connection
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=5, application_name="keyrelay notify",
                    **keepalives(self._url),
                ) as conn:
                    self._conn = conn
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    if gap:
                        log.info("listening for key changes again; every cached recheck is dropped")
                    # the first LISTEN too: sessions that logged in before it (the SMTP
                    # listeners open first; a slow database makes that seconds) may hold a
                    # verdict a change announced meanwhile, unheard here, has outdated
                    self._deliver(EVERYTHING)
                    self._ready.set()
                    delay = _RETRY_FIRST
                    async for notice in conn.notifies():
                        self._deliver(notice.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, never die
                if self.listening or not gap:
                    log.warning("not listening for key changes (%s: %s); open sessions follow them "
                                "through the periodic recheck until it is back",
                                redact(self._url), scrub(str(exc).strip().splitlines()[0], self._url)
                                if str(exc).strip() else type(exc).__name__)
            finally:
                self.listening = False
                self._conn = None
            gap = True
            self._ready.set()  # start() stops waiting after the first failed try, too
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)

    def _deliver(self, payload: str) -> None:
        try:
            self._on_change(payload or EVERYTHING)
        except Exception:  # a bug in the receiver must not stop the listening
            log.exception("cannot apply the key change %r", payload)
