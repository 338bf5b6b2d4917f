"""`relay queue ...`: look at and steer the queue, safely beside a running relay.

Every command is one call on the queue's storage API (relay/queue/store.py), the same
operations the relay itself uses; the running relay sees a change within half a second.
With `[queue] url` the queue is the cluster's (PostgreSQL): any node's command sees and
steers every node's messages, and `list` names the node delivering a message.
A message the relay is delivering at that moment is changed when its attempt ends, and
the command says so: nothing is delivered after an operator was told it would not be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from relay.delivery.replytext import clean
from relay.queue.model import Change, MessageHeld, MessageInfo, UnknownMessage, format_age
from relay.queue.postgres import PostgresQueueStore
from relay.queue.sqlite import SpoolUnusable, SqliteQueueStore
from relay.queue.store import QueueStore, SpoolError

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


def run_queue_command(spool_path: Path, args: argparse.Namespace, *, url: str | None = None) -> int:
    """`url`: the shared queue in PostgreSQL ([queue] url) instead of the sqlite spool."""
    try:
        return asyncio.run(_run(spool_path, args, url))
    except (UnknownMessage, MessageHeld) as exc:
        raise QueueRefused(str(exc)) from None
    except SpoolUnusable:
        raise  # names the file already; the CLI exits 2 on it
    except SpoolError as exc:
        text = str(exc)
        if url is not None:  # PostgresQueueStore's errors name the (redacted) URL already
            raise QueueRefused(text) from None
        raise QueueRefused(text if text.startswith(str(spool_path)) else f"{spool_path}: {text}") from None


async def _run(spool_path: Path, args: argparse.Namespace, url: str | None) -> int:
    store: QueueStore
    if url is not None:
        store = await PostgresQueueStore.open(url, relay=False)
    else:
        store = await SqliteQueueStore.open(spool_path, relay=False)
    try:
        return await _COMMANDS[args.queue_command](store, args)
    finally:
        await store.close()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row(info: MessageInfo, now: float) -> dict:
    if info.in_flight:
        next_attempt = "in flight"
    elif info.held:
        next_attempt = "held"
    else:
        next_attempt = "now" if info.next_attempt <= now else _when(info.next_attempt)
    return {"id": info.id, "created": _when(info.created), "age": format_age(now - info.created),
            "sender": info.mail_from, "key_id": info.key_id, "mailbox": info.mailbox, "route": info.route,
            "attempts": info.attempts, "next_attempt": next_attempt, "last_error": info.last_error,
            "held": info.held, "in_flight": info.in_flight, "node": info.node, "size": info.size,
            "recipients": info.pending}


async def _list(store: QueueStore, args: argparse.Namespace) -> int:
    now = time.time()
    rows = [_row(info, now) for info in await store.messages()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("the queue is empty")
        return 0
    print(f"{'ID':24} {'AGE':>5} {'SENDER':28} {'RCPTS':>5} {'NEXT ATTEMPT':21} {'NODE':16} LAST ERROR")
    for r in rows:
        print(f"{r['id']:24} {r['age']:>5} {r['sender'] or '<>':28.28} {len(r['recipients']):>5} "
              f"{r['next_attempt']:21} {r['node'] or '-':16.16} {r['last_error'] or '-'}")
    return 0


async def _show(store: QueueStore, args: argparse.Namespace) -> int:
    (info,) = await store.messages(args.id)
    row = _row(info, time.time())
    row["recipients"] = [asdict(r) for r in info.recipients]
    headers = BytesHeaderParser(policy=compat32).parsebytes(await store.body(args.id))
    # a header is the client's text: cleaned like a remote reply, so no escape sequence
    # reaches the operator's terminal
    row["headers"] = [[clean(str(k), 200), clean(str(v), 2000)] for k, v in headers.items()]
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    for key in ("id", "created", "age", "sender", "mailbox", "key_id", "route", "attempts",
                "next_attempt", "node", "last_error", "size"):
        print(f"{key + ':':14}{row[key] if row[key] not in (None, '') else '-'}")
    print("recipients:")
    for rcpt in row["recipients"]:
        print(f"  {rcpt['address']:40} {rcpt['status']:8} {rcpt['reply'] or ''}")
    print("headers:")
    for name, value in row["headers"]:
        print(f"  {name}: {value}")
    return 0


async def _retry(store: QueueStore, args: argparse.Namespace) -> int:
    if args.all:
        print(f"{await store.retry_all()} message(s) will be attempted now")
        return 0
    change = await store.retry(args.id)
    print(f"{args.id}: " + ("in flight: being attempted now" if change is Change.IN_FLIGHT
                            else "will be attempted now"))
    return 0


async def _delete(store: QueueStore, args: argparse.Namespace) -> int:
    change = await store.delete(args.id)
    print(f"{args.id}: " + ("in flight; removed after the current attempt" if change is Change.IN_FLIGHT
                            else "deleted, not delivered"))
    return 0


async def _hold(store: QueueStore, args: argparse.Namespace) -> int:
    change = await store.hold(args.id)
    print(f"{args.id}: " + ("in flight; on hold after the current attempt" if change is Change.IN_FLIGHT
                            else "on hold"))
    return 0


async def _release(store: QueueStore, args: argparse.Namespace) -> int:
    await store.release(args.id)
    print(f"{args.id}: released; will be attempted now")
    return 0


_COMMANDS = {"list": _list, "show": _show, "retry": _retry, "delete": _delete, "hold": _hold,
             "release": _release}
