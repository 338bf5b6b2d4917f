"""What /healthz and /readyz check, from the endpoint's thread.

/healthz: the event loop runs a callback within LOOP_WAIT. A wedged loop (a blocking call,
a runaway coroutine) answers no SMTP client either; the probe says so in a second
instead of hanging with it.

/readyz: the relay can take mail now:
* listeners: every configured listener is bound and serving (asked on the loop: its
  servers belong to it; a loop that does not answer is reported as such);
* spool: its folder takes a small write (a real write and unlink, not a permission
  check: root passes permission checks, but not a full or read-only filesystem); with a
  shared queue (`[queue] url`) its database also takes a new connection and its queue
  tables' version reads (that folder then holds only large messages as they arrive);
* keystore: its database opens read-only and its schema reads, and the pepper file
  reads (a removed, replaced or damaged file shows here; the relay's open connection
  would carry on with a deleted file until the next restart, which would then fail).
  A PostgreSQL keystore (`[keystore] url`): a new connection is made and the keystore's
  schema version reads (a server down, refusing logins, or without the tables shows here;
  the relay's pooled connections would only find out at the next AUTH). Its URL is shown
  without the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.metrics.collectors import on_loop

__all__ = ["LOOP_WAIT", "Readiness", "keystore_problem", "loop_problem", "queue_problem", "spool_problem"]

LOOP_WAIT = 1.0  # seconds the loop has to answer a probe
_PROBE_SIZE = 4096


def loop_problem(loop: asyncio.AbstractEventLoop, timeout: float = LOOP_WAIT) -> str | None:
    """None if `loop` ran a callback within `timeout` seconds, else why not."""
    try:
        on_loop(loop, lambda: None, timeout)
    except TimeoutError:
        return f"the event loop did not answer within {timeout:g} s"
    except RuntimeError:
        return "the event loop is not running"
    return None


def spool_problem(folder: Path) -> str | None:
    """None if a small file can be written in `folder` (then removed), else the error."""
    probe = folder / f".readyz-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, bytes(_PROBE_SIZE)) < _PROBE_SIZE:
                return f"{folder}: no space left"
        finally:
            os.close(fd)
    except OSError as exc:
        return f"{folder}: cannot write: {exc.strerror or exc}"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


def keystore_problem(path: Path | str, pepper: Path) -> str | None:
    """None if the keystore database opens read-only and its schema reads, and the pepper
    file reads; else what failed. Opened read-only so a missing file is never created.
    `path` may be a PostgreSQL keystore's URL."""
    if isinstance(path, str):
        problem = _postgres_keystore_problem(path)
        return problem if problem is not None else _pepper_problem(pepper)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=LOOP_WAIT)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{path}: {exc}"
    return _pepper_problem(pepper)


def _postgres_keystore_problem(url: str) -> str | None:
    return _postgres_problem(url, "keystore")


def queue_problem(url: str) -> str | None:
    """None if the shared queue's PostgreSQL (`[queue] url`) takes a new connection and
    its queue tables' version reads; else what failed, the password left out. There the
    spool is the database: every 250 waits on its commit."""
    return _postgres_problem(url, "queue")


def _postgres_problem(url: str, component: str) -> str | None:
    import psycopg  # only relays on PostgreSQL load the driver

    from keystore.pg import redact, scrub

    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            row = conn.execute("SELECT version FROM keyrelay_schema WHERE component = %s",
                               (component,)).fetchone()
    except psycopg.Error as exc:
        lines = str(exc).strip().splitlines()
        return f"{redact(url)}: {scrub(lines[0], url) if lines else type(exc).__name__}"
    if row is None:
        return f"{redact(url)}: no {component} tables in this database"
    return None


def _pepper_problem(pepper: Path) -> str | None:
    try:
        with open(pepper, "rb") as handle:
            if not handle.read(1):
                return f"{pepper}: the pepper file is empty"
    except OSError as exc:
        return f"{pepper}: {exc.strerror or exc}"
    return None


@dataclass(frozen=True, slots=True)
class Readiness:
    loop: asyncio.AbstractEventLoop
    listening: Callable[[], str | None]  # run on the loop: None when every listener serves
    spool_folder: Path | None
    keystore: Path | str  # a sqlite file, or a PostgreSQL keystore's URL
    pepper: Path
    queue_url: str | None = None  # a shared queue's PostgreSQL ([queue] url)

    def alive(self) -> str | None:
        return loop_problem(self.loop)

    def problems(self) -> dict[str, str]:
        """What is not ready, by part (empty when ready)."""
        found: dict[str, str] = {}
        try:
            listening = on_loop(self.loop, self.listening, LOOP_WAIT)
        except TimeoutError:
            found["event_loop"] = f"the event loop did not answer within {LOOP_WAIT:g} s"
        except Exception as exc:  # noqa: BLE001 - a closed loop, or the check itself failed
            if self.loop.is_closed():
                found["event_loop"] = "the event loop is not running"
            else:
                found["listeners"] = f"cannot check: {exc!r}"
        else:
            if listening is not None:
                found["listeners"] = listening
        spool = "no [queue] configured" if self.spool_folder is None else spool_problem(self.spool_folder)
        if spool is None and self.queue_url is not None:
            spool = queue_problem(self.queue_url)
        if spool is not None:
            found["spool"] = spool
        keystore = keystore_problem(self.keystore, self.pepper)
        if keystore is not None:
            found["keystore"] = keystore
        return found
