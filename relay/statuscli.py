"""`relay status [--json]`: how the relay is doing, for an operator or a monitoring script.

Three sources, each read without disturbing the relay:
  * the spool, opened read-only (queue depth, held messages, the oldest message): works
    whether or not a relay runs; with `[queue] url` the whole cluster's queue in
    PostgreSQL, and the nodes sharing it (running or not, when each last renewed);
  * the [tls] certificate file (its expiry): works without a relay too;
  * the state file the running relay writes (relay/statefile.py): provider health,
    deliveries in the last 5/15/60 minutes, open sessions. If no relay runs (no state
    file, a stale one, a dead pid) the output says so and shows the rest.

Exit 0 whatever the relay's state; 1 with one line on stderr if the config or the spool
cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay.config import ConfigError, load_config, resolve_config_path
from relay.delivery.health import format_seconds
from relay.queue.model import QueueDepth
from relay.queue.postgres import NodeInfo, PostgresQueueStore
from relay.queue.sqlite import read_depth
from relay.queue.store import SpoolError
from relay.statefile import WINDOWS, certificate_info, read_state

__all__ = ["add_status_parser", "run_status_command"]


class StatusError(Exception):
    """The config or the spool cannot be read: one line, exit 1."""


def add_status_parser(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="queue, provider health, recent deliveries, certificate")
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")


def run_status_command(config_arg: str | None, *, as_json: bool) -> int:
    try:
        report = status_report(config_arg)
    except (ConfigError, StatusError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report, time.time()))
    return 0


def status_report(config_arg: str | None) -> dict[str, Any]:
    config = load_config(resolve_config_path(config_arg))
    if config.queue is None:
        raise StatusError(f"{config.source}: [queue]: required for `relay status`")
    now = time.time()
    live = read_state(config.state_path, now)
    doc = live.doc if live.running else None
    relay: dict[str, Any] = {"running": live.running, "detail": live.detail,
                             "state_file": str(config.state_path)}
    if live.doc is not None:
        relay.update(pid=live.doc.get("pid"), started_at=live.doc.get("started_at"),
                     state_written_at=live.doc.get("written_at"))
    return {
        "now": now,
        "relay": relay,
        "queue": queue_summary(config.queue.path, now, url=config.queue.url, lease=config.cluster.lease),
        "certificate": certificate_info(config.tls.cert if config.tls else None),
        "sessions": doc.get("sessions") if doc else None,
        "providers": doc.get("providers") if doc else None,
        "deliveries": doc.get("deliveries") if doc else None,
    }


def queue_summary(path: Path, now: float, *, url: str | None = None, lease: float = 60.0) -> dict[str, Any]:
    """Counts from the spool, read-only (nothing is migrated or claimed); with `url`, the
    cluster's queue in PostgreSQL and its nodes."""
    nodes: list[NodeInfo] | None = None
    try:
        if url is None:
            depth = read_depth(path)
        else:
            depth, nodes = asyncio.run(_cluster_depth(url, lease))
    except SpoolError as exc:
        raise StatusError(str(exc)) from None
    oldest = depth.oldest_created
    summary: dict[str, Any] = {
        "path": str(path), "messages": depth.messages, "held": depth.held,
        "oldest_id": depth.oldest_id, "oldest_created": oldest,
        "oldest_age": max(now - oldest, 0.0) if oldest is not None else None,
    }
    if url is not None and nodes is not None:
        summary["url"] = PostgresQueueStore.redacted(url)
        summary["nodes"] = [{"node": n.node, "running": n.running, "started": n.started,
                             "last_seen": n.last_seen, "stopped": n.stopped} for n in nodes]
    return summary


async def _cluster_depth(url: str, lease: float) -> tuple[QueueDepth, list[NodeInfo]]:
    store = await PostgresQueueStore.open(url, relay=False, lease=lease)
    try:
        return await store.depth(), await store.nodes()
    finally:
        await store.close()


# ---------------------------------------------------------------- text


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ago(ts: float, now: float) -> str:
    return f"{format_seconds(now - ts)} ago"


def render(report: dict[str, Any], now: float) -> str:
    lines: list[str] = []
    relay = report["relay"]
    if relay["running"]:
        started = relay.get("started_at")
        since = f", started {_when(started)}, {_ago(started, now)}" if started else ""
        lines.append(f"relay:        running, pid {relay['pid']}{since}")
    else:
        lines.append("relay:        NOT RUNNING: provider health, deliveries and sessions are unavailable "
                     f"({relay['detail']})")
    if report["sessions"] is not None:
        lines.append(f"sessions:     {report['sessions'].get('open', 0)} open")
    queue = report["queue"]
    text = f"{queue['messages']} message(s), {queue['held']} held"
    if queue["oldest_age"] is not None:
        text += f", oldest {format_seconds(queue['oldest_age'])} ({queue['oldest_id']})"
    if "url" in queue:
        text += f" in {queue['url']} (the whole cluster)"
    lines.append(f"queue:        {text}")
    if queue.get("nodes") is not None:
        lines += ["", "nodes:", _nodes(queue["nodes"], now)]
    cert = report["certificate"]
    if cert is None:
        lines.append("certificate:  none ([tls] not configured)")
    elif cert["not_after"] is None:
        lines.append(f"certificate:  {cert['path']}: cannot read: {cert['error']}")
    else:
        left = cert["not_after"] - now
        when = f"in {format_seconds(left)}" if left > 0 else "EXPIRED"
        lines.append(f"certificate:  {cert['path']}: expires {_when(cert['not_after'])} ({when})")
    if report["providers"] is not None:
        lines += ["", "providers:", _providers(report["providers"], now)]
    if report["deliveries"] is not None:
        lines += ["", "deliveries (recipients sent/deferred/failed):", _deliveries(report["deliveries"])]
    return "\n".join(lines)


def _nodes(nodes: list[dict[str, Any]], now: float) -> str:
    if not nodes:
        return "  (no relay has used this queue yet)"
    rows = [("NODE", "STATE", "STARTED", "LAST SEEN")]
    for n in nodes:
        state = "running" if n["running"] else ("stopped" if n["stopped"] is not None else "NOT RENEWING")
        rows.append((n["node"], state, _when(n["started"]), _ago(n["last_seen"], now)))
    return _table(rows)


def _providers(providers: list[dict[str, Any]], now: float) -> str:
    if not providers:
        return "  (no smarthost upstreams)"
    rows = [("UPSTREAM", "STATE", "SINCE", "FAILURES", "NEXT PROBE", "LAST ERROR")]
    for p in providers:
        if p["up"]:
            probe = "-"
        elif p["probing"]:
            probe = "under way"
        else:
            wait = p["down_until"] - now
            probe = f"in {format_seconds(wait)}" if wait > 0 else "due"
        rows.append((p["name"], "up" if p["up"] else "DOWN", _ago(p["since"], now), str(p["failures"]),
                     probe, p["last_error"] or "-"))
    return _table(rows)


def _deliveries(deliveries: dict[str, dict[str, dict[str, int]]]) -> str:
    upstreams = sorted({name for window in deliveries.values() for name in window})
    if not upstreams:
        return "  (none in the last hour)"
    rows = [("UPSTREAM", *(f"LAST {label.upper()}" for label in WINDOWS))]
    for name in upstreams:
        cells = []
        for label in WINDOWS:
            c = deliveries.get(label, {}).get(name, {})
            cells.append(f"{c.get('sent', 0)}/{c.get('deferred', 0)}/{c.get('failed', 0)}")
        rows.append((name, *cells))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
                     + "  " + row[-1] for row in rows)
