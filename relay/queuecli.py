"""`relay queue ...`: look at and steer the spool, safely beside a running relay.

Each command is one short sqlite transaction on the spool file; the running relay sees
the change through sqlite's data_version within half a second and reschedules (see
relay/delivery/engine.py), so nothing is corrupted and nothing delivered twice.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

__all__ = ["QueueRefused", "add_queue_parser", "run_queue_command"]


class QueueRefused(Exception):
    """A queue command that cannot be done (unknown id, message on hold, ...)."""


def add_queue_parser(commands: argparse._SubParsersAction) -> None:
    queue = commands.add_parser("queue", help="list, inspect, retry, hold or delete queued mail")
    actions = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="messages waiting for delivery")
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("show", help="one message: envelope, recipients, headers")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = actions.add_parser("retry", help="attempt delivery now")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?")
    target.add_argument("--all", action="store_true")
    for name, text in (("delete", "remove a message without delivering it"),
                       ("hold", "keep a message from being attempted"),
                       ("release", "let a held message be delivered (now)")):
        actions.add_parser(name, help=text).add_argument("id")


def run_queue_command(spool_path: Path, args: argparse.Namespace) -> int:
    if not spool_path.exists():
        raise QueueRefused(f"{spool_path}: no spool yet (the relay creates it when it starts)")
    conn = sqlite3.connect(spool_path, isolation_level=None, timeout=5)
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")  # a deleted message takes its recipients along
        return _COMMANDS[args.queue_command](conn, args)
    except sqlite3.Error as exc:
        raise QueueRefused(f"{spool_path}: {exc}") from None
    finally:
        conn.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _rows(conn: sqlite3.Connection, where: str = "", params: tuple = ()) -> list[dict]:
    rows = conn.execute(
        "SELECT id, created, mail_from, key_id, mailbox, route, attempts, next_attempt, last_error, held, "
        "(SELECT group_concat(address, ' ') FROM recipient r WHERE r.message_id = m.id AND "
        f"r.status = 'pending') FROM message m {where} ORDER BY created", params,
    ).fetchall()
    now = time.time()
    return [
        {"id": r[0], "created": _when(r[1]), "age": _age(now - r[1]), "sender": r[2], "key_id": r[3],
         "mailbox": r[4], "route": r[5], "attempts": r[6],
         "next_attempt": "held" if r[9] else ("now" if r[7] <= now else _when(r[7])),
         "last_error": r[8], "held": bool(r[9]), "recipients": (r[10] or "").split()}
        for r in rows
    ]


def _list(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    rows = _rows(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the queue is empty")
        return 0
    print(f"{'ID':24} {'AGE':>5} {'SENDER':28} {'RCPTS':>5} {'NEXT ATTEMPT':21} LAST ERROR")
    for r in rows:
        print(f"{r['id']:24} {r['age']:>5} {r['sender'] or '<>':28.28} {len(r['recipients']):>5} "
              f"{r['next_attempt']:21} {r['last_error'] or '-'}")
    return 0


def _one(conn: sqlite3.Connection, message_id: str) -> dict:
    rows = _rows(conn, "WHERE id = ?", (message_id,))
    if not rows:
        raise QueueRefused(f"no message {message_id} in the queue")
    return rows[0]


def _show(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    info = _one(conn, args.id)
    info["recipients"] = [
        {"address": a, "status": s, "reply": r} for a, s, r in conn.execute(
            "SELECT address, status, reply FROM recipient WHERE message_id = ? ORDER BY rowid", (args.id,))
    ]
    body = conn.execute("SELECT body FROM message WHERE id = ?", (args.id,)).fetchone()[0]
    headers = BytesHeaderParser(policy=compat32).parsebytes(body)
    info["size"] = len(body)
    info["headers"] = [[k, str(v)] for k, v in headers.items()]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("id", "created", "age", "sender", "mailbox", "key_id", "route", "attempts",
                "next_attempt", "last_error", "size"):
        print(f"{key + ':':14}{info[key] if info[key] not in (None, '') else '-'}")
    print("recipients:")
    for rcpt in info["recipients"]:
        print(f"  {rcpt['address']:40} {rcpt['status']:8} {rcpt['reply'] or ''}")
    print("headers:")
    for name, value in info["headers"]:
        print(f"  {name}: {value}")
    return 0


def _change(conn: sqlite3.Connection, sql: str, message_id: str, verb: str) -> int:
    _one(conn, message_id)
    conn.execute(sql, (message_id,))
    print(f"{message_id}: {verb}")
    return 0


def _retry(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    if args.all:
        count = conn.execute("UPDATE message SET next_attempt = 0 WHERE held = 0").rowcount
        print(f"{count} message(s) will be attempted now")
        return 0
    if _one(conn, args.id)["held"]:
        raise QueueRefused(f"{args.id} is on hold; `relay queue release {args.id}` first")
    return _change(conn, "UPDATE message SET next_attempt = 0 WHERE id = ?", args.id, "will be attempted now")


def _delete(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    return _change(conn, "DELETE FROM message WHERE id = ?", args.id, "deleted, not delivered")


def _hold(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    return _change(conn, "UPDATE message SET held = 1 WHERE id = ?", args.id, "on hold")


def _release(conn: sqlite3.Connection, args: argparse.Namespace) -> int:
    return _change(conn, "UPDATE message SET held = 0, next_attempt = 0 WHERE id = ?", args.id,
                   "released; will be attempted now")


_COMMANDS = {"list": _list, "show": _show, "retry": _retry, "delete": _delete, "hold": _hold,
             "release": _release}
