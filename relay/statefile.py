"""The running relay's state file (`Config.state_path`, `relay-state.json` beside the
spool): what `relay status` shows that the spool cannot tell, provider health, recent
deliveries, open sessions.

The relay writes it every WRITE_INTERVAL seconds and at each provider health transition,
atomically (a temporary file renamed over it, so a reader never sees half a file), off
the event loop, mode 0640 (a monitoring group may read it; it holds no secret, address
or key id). It is removed at a clean shutdown; a file left by a relay that died goes
stale, which the reader tells from its age and pid.

Keys (version 1), all times Unix seconds:
    version, pid, started_at, written_at, interval
    providers:    [{name, up, failures, down_until, since, last_error, backoff, probing, downs}]
    deliveries:   {"5m"|"15m"|"60m": {upstream: {"sent": n, "deferred": n, "failed": n}}}
    sessions:     {"open": sessions greeted, "connections": connection slots taken}
    certificate:  {"path", "not_after" (or null), "error" (or null)}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.delivery.health import format_seconds

if TYPE_CHECKING:
    from relay.app import Relay

__all__ = ["STATE_VERSION", "WINDOWS", "WRITE_INTERVAL", "LiveState", "StateWriter", "certificate_not_after",
           "read_state", "relay_state", "write_state"]

log = logging.getLogger("relay")

STATE_VERSION = 1
WRITE_INTERVAL = 2.0  # seconds between writes (and at each provider health transition)
STALE_AFTER = 5  # a file older than this many intervals is no running relay's
WINDOWS = {"5m": 300, "15m": 900, "60m": 3600}  # delivery counts over the last ...


def relay_state(relay: Relay, started_at: float, interval: float = WRITE_INTERVAL) -> dict[str, Any]:
    """The state of a running relay, read on the event loop (in-memory only, no I/O)."""
    counts = relay.health.counts
    return {
        "version": STATE_VERSION,
        "pid": os.getpid(),
        "started_at": started_at,
        "written_at": time.time(),
        "interval": interval,
        "providers": [asdict(state) for state in relay.health.snapshot()],
        "deliveries": {label: counts.totals(seconds) for label, seconds in WINDOWS.items()},
        "sessions": {"open": len(relay.registry.live), "connections": relay.registry.count},
    }


_cert_cache: dict[Path, tuple[tuple[int, int], float]] = {}


def certificate_not_after(path: Path) -> float:
    """The not-after time of the first certificate in a PEM file; OSError or ValueError if
    it cannot be read. Cached per file version (mtime, size): the writer asks every few seconds."""
    info = path.stat()
    version = (info.st_mtime_ns, info.st_size)
    cached = _cert_cache.get(path)
    if cached is not None and cached[0] == version:
        return cached[1]
    from cryptography import x509

    not_after = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()
    _cert_cache[path] = (version, not_after)
    return not_after


def certificate_info(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return {"path": str(path), "not_after": certificate_not_after(path), "error": None}
    except OSError as exc:
        return {"path": str(path), "not_after": None, "error": exc.strerror or str(exc)}
    except ValueError as exc:
        return {"path": str(path), "not_after": None, "error": f"not a PEM certificate ({exc})"}


def write_state(path: Path, doc: dict[str, Any], cert: Path | None = None) -> None:
    """Write `doc` (plus the certificate's expiry) to `path` atomically. Blocking: run it
    in a thread."""
    doc = dict(doc, certificate=certificate_info(cert))
    data = json.dumps(doc, indent=1).encode()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StateWriter:
    """Writes the state file while the relay runs; `poke()` asks for a write now."""

    def __init__(self, path: Path, collect: Callable[[], dict[str, Any]], cert: Callable[[], Path | None],
                 interval: float = WRITE_INTERVAL) -> None:
        self.path = path
        self._collect = collect
        self._cert = cert
        self.interval = interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_relay(cls, relay: Relay, interval: float = WRITE_INTERVAL) -> StateWriter:
        path = relay.config.state_path
        assert path is not None
        started_at = time.time()

        def cert() -> Path | None:
            tls = relay.config.tls  # the config in force: a reload may name another file
            return None if tls is None else tls.cert

        writer = cls(path, lambda: relay_state(relay, started_at, interval), cert, interval)
        relay.health.on_change(writer.poke)
        return writer

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self._write()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see relay/queue/schedule.py
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    async def _write(self) -> None:
        try:
            await asyncio.to_thread(write_state, self.path, self._collect(), self._cert())
        except Exception as exc:  # noqa: BLE001 - a status file is no reason to stop; said once
            if not self._failing:
                log.warning("cannot write the state file %s (%s); `relay status` will call it stale",
                            self.path, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("state file %s written again", self.path)
            self._failing = False

    async def stop(self) -> None:
        """Stop writing (a write under way finishes first) and remove the file: no relay
        runs on this spool any more."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except TimeoutError:
                self._task.cancel()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.path.unlink, True)


@dataclass(frozen=True, slots=True)
class LiveState:
    """What the state file says about the relay: `running` only if it was written
    recently by a process that is still alive; `doc` is the file's content (None if
    there is none or it cannot be read) and `detail` says why it is not live."""

    running: bool
    doc: dict[str, Any] | None
    detail: str


def read_state(path: Path | None, now: float | None = None) -> LiveState:
    if path is None:
        return LiveState(False, None, "no [queue], so no state file")
    now = time.time() if now is None else now
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return LiveState(False, None, f"no state file at {path}")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return LiveState(False, None, f"{path}: cannot read the state file ({reason})")
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION or not _well_formed(doc):
        return LiveState(False, None, f"{path}: not a state file this version understands")
    pid, written = doc["pid"], float(doc["written_at"])
    interval = float(doc.get("interval", WRITE_INTERVAL))
    age = now - written
    if not _alive(pid):
        return LiveState(False, doc, f"stale: written by pid {pid}, which is not running")
    if age > STALE_AFTER * interval:
        return LiveState(False, doc, f"stale: last written {format_seconds(age)} ago by pid {pid}")
    return LiveState(True, doc, "running")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _well_formed(doc: dict[str, Any]) -> bool:
    """The shape relay_state() writes, as far as `relay status` reads it: a damaged file, or
    one something else wrote, is "not understood" rather than a traceback or a NaN age
    that never goes stale."""
    sessions, providers = doc.get("sessions", {}), doc.get("providers", [])
    deliveries = doc.get("deliveries", {})
    return (
        isinstance(doc.get("pid"), int) and 0 < doc["pid"] < 2**31 and _number(doc.get("written_at"))
        and _number(doc.get("interval", WRITE_INTERVAL)) and _number(doc.get("started_at", 0))
        and isinstance(sessions, dict) and all(_number(v) for v in sessions.values())
        and isinstance(providers, list) and all(_provider_ok(p) for p in providers)
        and isinstance(deliveries, dict)
        and all(isinstance(w, dict) and all(isinstance(c, dict) and all(_number(n) for n in c.values())
                                            for c in w.values()) for w in deliveries.values())
    )


def _provider_ok(p: object) -> bool:
    return (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("up"), bool)
            and isinstance(p.get("probing"), bool) and _number(p.get("since")) and _number(p.get("failures"))
            and (p.get("down_until") is None or _number(p.get("down_until")))
            and (p.get("last_error") is None or isinstance(p.get("last_error"), str))
            and (p["up"] or p["probing"] or p.get("down_until") is not None))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
