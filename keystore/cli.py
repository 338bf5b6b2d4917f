"""`keystore`: the admin CLI for workspaces, mailboxes, auth keys and the audit log.

The command names and flags are a contract with operators' scripts. Exit status: 0 done,
1 refused (one line on stderr saying why), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from keystore.keys import PepperError
from keystore.models import PERMISSIONS, AuthKey, Mailbox
from keystore.store import KeyStore, KeystoreUnavailable, StoreError
from relay.config import ConfigError, load_config, parse_duration, resolve_config_path

__all__ = ["main"]

EXIT_REFUSED, EXIT_USAGE = 1, 2


class Refused(Exception):
    """Raised by a command for exit status 1 with a one-line message."""


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything this tool creates (db, pepper, backups) is private
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(resolve_config_path(args.config))
    except ConfigError as exc:
        print(f"keystore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, config))
    except (Refused, StoreError, KeystoreUnavailable, PepperError) as exc:
        print(f"keystore: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:  # bad --ttl / --expires / --grace values
        print(f"keystore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, config) -> int:
    ks = config.keystore
    if args.command == "init":
        return await _init(ks)
    store = await KeyStore.open(ks.path, ks.pepper_file, default_key_limit=ks.default_key_limit)
    try:
        return await args.handler(store, args, config)
    finally:
        await store.close()


async def _init(ks) -> int:
    if ks.path.exists() and not ks.pepper_file.exists():
        raise Refused(
            f"{ks.pepper_file}: pepper file missing for the existing keystore {ks.path}; "
            "restore it (a new pepper would make every key invalid)"
        )
    existed = ks.path.exists()
    store = await KeyStore.open(
        ks.path, ks.pepper_file, default_key_limit=ks.default_key_limit, create=True
    )
    await store.close()
    state = "is up to date" if existed else "created"
    print(f"keystore {ks.path} {state}; pepper {ks.pepper_file} (mode 0600)")
    return 0


def _actor() -> str:
    return os.environ.get("KEYSTORE_ACTOR") or os.environ.get("SUDO_USER") or getpass.getuser()


# ------------------------------------------------------------------ output


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_json(key: AuthKey) -> dict:
    data = dataclasses.asdict(key)
    data["permissions"] = list(key.permissions)
    data["scope"] = key.scope
    for name in ("created", "expires", "rotated", "previous_valid_until", "last_used"):
        data[name] = _when(data[name]) if data[name] is not None else None
    return data


def _mailbox_json(mailbox: Mailbox) -> dict:
    data = dataclasses.asdict(mailbox)
    data["aliases"] = list(mailbox.aliases)
    data["created"] = _when(mailbox.created)
    data["suspended_at"] = _when(mailbox.suspended_at) if mailbox.suspended_at else None
    return data


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _show_key(key: AuthKey) -> None:
    fields = [
        ("id", key.id), ("name", key.name), ("status", key.status), ("scope", key.scope),
        ("permissions", " ".join(key.permissions)), ("owner", key.owner), ("note", key.note),
        ("route", key.route), ("rate limit", key.rate_limit),
        ("allowed from", " ".join(key.allow_from) or "anywhere"),
        ("created", _when(key.created)), ("expires", _when(key.expires)),
        ("rotated", _when(key.rotated)),
        ("old secret valid until", _when(key.previous_valid_until)),
        ("last used", _when(key.last_used)), ("last client", key.last_ip),
    ]
    for label, value in fields:
        print(f"{label + ':':24}{'-' if value is None else value}")


def _print_secret(key: AuthKey, secret: str, args: argparse.Namespace, verb: str) -> None:
    if args.json:
        _print_json({**_key_json(key), "secret": secret})
        return
    print(f"{verb} key {key.id} ({key.name!r}, {key.scope})")
    print()
    print(f"    {secret}")
    print()
    print("This is the only time the key is shown. Store it in the tool that uses it;")
    print(f"SMTP username: {key.mailbox or 'any mailbox address of workspace ' + key.workspace}")


# ---------------------------------------------------------------- commands


async def _mailbox_add(store: KeyStore, args, config) -> int:
    _check_route(args.route, config)
    mailbox = await store.add_mailbox(
        args.address, workspace=args.workspace, aliases=args.alias, route=args.route,
        actor=_actor(),
    )
    aliases = f" (aliases: {', '.join(mailbox.aliases)})" if mailbox.aliases else ""
    print(f"mailbox {mailbox.address} added to workspace {mailbox.workspace}{aliases}")
    return 0


async def _mailbox_list(store: KeyStore, args, config) -> int:
    mailboxes = await store.list_mailboxes(args.workspace)
    if args.json:
        _print_json([_mailbox_json(m) for m in mailboxes])
        return 0
    _table(
        ["ADDRESS", "WORKSPACE", "STATUS", "KEYS", "WORKSPACE KEYS", "ALIASES", "SUSPENDED"],
        [[m.address, m.workspace, m.status, m.keys, m.workspace_keys, " ".join(m.aliases) or None,
          f"{_when(m.suspended_at)} {m.suspended_reason or ''}".strip() if m.suspended_at else None]
         for m in mailboxes],
    )
    return 0


async def _mailbox_suspend(store: KeyStore, args, config) -> int:
    mailbox = await store.suspend_mailbox(args.address, reason=args.reason, actor=_actor())
    print(f"mailbox {mailbox.address} suspended; {mailbox.keys + mailbox.workspace_keys} key(s) "
          f"stop working for it until it is resumed ({mailbox.keys} mailbox key(s), "
          f"{mailbox.workspace_keys} workspace key(s) of {mailbox.workspace})")
    return 0


async def _mailbox_resume(store: KeyStore, args, config) -> int:
    mailbox = await store.resume_mailbox(args.address, actor=_actor())
    print(f"mailbox {mailbox.address} resumed")
    return 0


async def _mailbox_remove(store: KeyStore, args, config) -> int:
    deleted = await store.remove_mailbox(args.address, force=args.force, actor=_actor())
    print(f"mailbox {args.address} removed" + (f" with {deleted} key(s)" if deleted else ""))
    return 0


def _expiry(args) -> float | None:
    if args.ttl:
        return datetime.now(UTC).timestamp() + parse_duration(args.ttl)
    if args.expires:
        return parse_iso(args.expires)
    return None


def parse_iso(text: str) -> float:
    """ISO 8601 date or date-time; UTC unless it carries an offset. A bare date is 00:00 UTC."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid ISO 8601 date or date-time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _check_route(route: str | None, config) -> None:
    names = config.route_names
    if route is not None and names and route not in names:
        raise Refused(f"unknown route {route!r}: no [[upstream]] or [[group]] of that name "
                      f"(have: {', '.join(names)})")


async def _key_create(store: KeyStore, args, config) -> int:
    _check_route(args.route, config)
    key, secret = await store.create_key(
        mailbox=args.mailbox, workspace=args.workspace, name=args.name, owner=args.owner,
        note=args.note, permissions=args.scope or ["email.send"], expires=_expiry(args),
        route=args.route, rate_limit=args.rate_limit, allow_from=args.allow_from or (),
        actor=_actor(),
    )
    _print_secret(key, secret, args, "created")
    return 0


async def _key_list(store: KeyStore, args, config) -> int:
    found = await store.list_keys(
        mailbox=args.mailbox, workspace=args.workspace, search=args.search, status=args.status
    )
    if args.json:
        _print_json([_key_json(k) for k in found])
        return 0
    _table(
        ["ID", "NAME", "STATUS", "SCOPE", "OWNER", "CREATED", "EXPIRES", "LAST USED"],
        [[k.id, k.name, k.status, k.scope, k.owner, _when(k.created), _when(k.expires),
          _when(k.last_used)] for k in found],
    )
    return 0


async def _key_show(store: KeyStore, args, config) -> int:
    key = await store.get_key(args.id)
    if args.json:
        _print_json(_key_json(key))
    else:
        _show_key(key)
    return 0


async def _key_status(store: KeyStore, args, config) -> int:
    change = {"disable": store.disable_key, "enable": store.enable_key, "revoke": store.revoke_key}
    key = await change[args.key_command](args.id, actor=_actor())
    print(f"key {key.id} ({key.name!r}) is now {key.status}")
    return 0


async def _key_rotate(store: KeyStore, args, config) -> int:
    if args.end_grace:
        key = await store.end_rotation_grace(args.id, actor=_actor())
        if args.json:
            print(json.dumps(_key_json(key), indent=2))
        else:
            print(f"key {key.id} ({key.name!r}): the previous secret no longer works (grace ended)")
        return 0
    grace = parse_duration(args.grace) if args.grace else 0.0
    key, secret = await store.rotate_key(args.id, grace=grace, actor=_actor())
    _print_secret(key, secret, args, "rotated")
    if not args.json:
        until = _when(key.previous_valid_until) if grace else "no longer (stopped now)"
        print(f"The previous secret is valid until: {until}")
    return 0


async def _key_delete(store: KeyStore, args, config) -> int:
    key = await store.get_key(args.id)
    if not args.yes:
        print(f"Deleting key {key.id} cannot be undone. Type its name ({key.name}) to confirm: ",
              end="", flush=True)
        answer = sys.stdin.readline().strip()
        if answer != key.name:
            raise Refused("confirmation did not match the key's name; nothing deleted")
    await store.delete_key(key.id, actor=_actor())
    print(f"key {key.id} ({key.name!r}) deleted")
    return 0


async def _audit(store: KeyStore, args, config) -> int:
    events = await store.audit_events(
        key_id=args.key, mailbox=args.mailbox,
        since=parse_iso(args.since) if args.since else None,
    )
    if args.json:
        _print_json([{**dataclasses.asdict(e), "at": _when(e.at)} for e in events])
        return 0
    _table(["WHEN", "ACTOR", "ACTION", "KEY", "MAILBOX", "DETAIL"],
           [[_when(e.at), e.actor, e.action, e.key_id, e.mailbox, e.detail] for e in events])
    return 0


async def _workspace_list(store: KeyStore, args, config) -> int:
    spaces = await store.list_workspaces()
    if args.json:
        _print_json([{**dataclasses.asdict(w), "suspended_at": _when(w.suspended_at)
                      if w.suspended_at else None} for w in spaces])
        return 0
    _table(["WORKSPACE", "STATUS", "MAILBOXES", "ACTIVE KEYS", "KEY LIMIT", "SUSPENDED"],
           [[w.name, w.status, w.mailboxes, w.active_keys, w.key_limit,
             f"{_when(w.suspended_at)} {w.suspended_reason or ''}".strip() if w.suspended_at else None]
            for w in spaces])
    return 0


async def _workspace_suspend(store: KeyStore, args, config) -> int:
    mailbox_keys, workspace_keys = await store.suspend_workspace(
        args.workspace, reason=args.reason, actor=_actor())
    print(f"workspace {args.workspace} suspended; its {mailbox_keys + workspace_keys} key(s) "
          f"({mailbox_keys} mailbox key(s), {workspace_keys} workspace key(s)) stop working "
          "until it is resumed")
    return 0


async def _workspace_resume(store: KeyStore, args, config) -> int:
    await store.resume_workspace(args.workspace, actor=_actor())
    print(f"workspace {args.workspace} resumed")
    return 0


async def _workspace_limit(store: KeyStore, args, config) -> int:
    await store.set_key_limit(args.workspace, args.limit, actor=_actor())
    print(f"workspace {args.workspace}: at most {args.limit} active keys")
    return 0


async def _serve(store: KeyStore, args, config) -> int:
    from keystore.http import serve  # the HTTP stack loads only for this command

    return await serve.run(store, config, listen=args.listen)


async def _backup(store: KeyStore, args, config) -> int:
    await store.backup(Path(args.path))
    print(f"keystore copied to {args.path} (mode 0600)")
    return 0


# ------------------------------------------------------------------ parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keystore", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="relay config file (default: $RELAY_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("init", help="create the keystore database and pepper file")

    mailbox = commands.add_parser("mailbox", help="manage mailboxes").add_subparsers(
        dest="mailbox_command", required=True, metavar="ACTION")
    p = mailbox.add_parser("add", help="add a mailbox")
    p.add_argument("address")
    p.add_argument("--workspace", default="default")
    p.add_argument("--alias", action="append", default=[], metavar="ADDR")
    p.add_argument("--route", help="upstream for this mailbox's mail (overridden by a key's)")
    p.set_defaults(handler=_mailbox_add)
    p = mailbox.add_parser("list", help="list mailboxes")
    p.add_argument("--workspace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_mailbox_list)
    p = mailbox.add_parser("suspend", help="stop every key of a mailbox until resumed")
    p.add_argument("address")
    p.add_argument("--reason")
    p.set_defaults(handler=_mailbox_suspend)
    p = mailbox.add_parser("resume", help="resume a suspended mailbox")
    p.add_argument("address")
    p.set_defaults(handler=_mailbox_resume)
    p = mailbox.add_parser("remove", help="remove a mailbox")
    p.add_argument("address")
    p.add_argument("--force", action="store_true", help="also delete its keys")
    p.set_defaults(handler=_mailbox_remove)

    key = commands.add_parser("key", help="manage auth keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION")
    p = key.add_parser("create", help="create a key (its secret is shown once)")
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--mailbox", metavar="ADDRESS")
    scope.add_argument("--workspace", metavar="W")
    p.add_argument("--name", required=True, help="what uses it, e.g. 'CRM sync'")
    p.add_argument("--owner", metavar="WHO")
    p.add_argument("--note")
    p.add_argument("--scope", action="append", choices=PERMISSIONS, metavar="PERM",
                   help=f"permission, repeatable ({', '.join(PERMISSIONS)}); default email.send")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", metavar="ISO-DATE")
    expiry.add_argument("--ttl", metavar="DURATION", help="e.g. 30d, 24h")
    p.add_argument("--route", metavar="NAME")
    p.add_argument("--rate-limit", type=int, metavar="N",
                   help="messages per minute for this key (default: the relay's rate_per_minute)")
    p.add_argument("--allow-from", action="append", metavar="CIDR",
                   help="client network the key may log in from, repeatable, IPv4 or IPv6 "
                        "(e.g. 192.0.2.0/24, 2001:db8::/48); default: anywhere")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_create)
    p = key.add_parser("list", help="list and search keys")
    p.add_argument("--mailbox", metavar="A")
    p.add_argument("--workspace", metavar="W")
    p.add_argument("--search", metavar="TEXT")
    p.add_argument("--status", metavar="S", choices=["active", "disabled", "revoked"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_list)
    p = key.add_parser("show", help="show one key")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_show)
    for action, text in (("disable", "stop a key (reversible)"), ("enable", "re-enable a key"),
                         ("revoke", "revoke a key, immediately and for good")):
        p = key.add_parser(action, help=text)
        p.add_argument("id")
        p.set_defaults(handler=_key_status)
    p = key.add_parser("rotate", help="give a key a new secret")
    p.add_argument("id")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--grace", metavar="DURATION", help="keep the old secret valid this long")
    when.add_argument("--end-grace", action="store_true",
                      help="retire the previous secret now, before its grace ends (no new secret)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_rotate)
    p = key.add_parser("delete", help="delete a key record")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_key_delete)

    p = commands.add_parser("audit", help="show the audit log")
    p.add_argument("--key", metavar="ID")
    p.add_argument("--mailbox", metavar="A")
    p.add_argument("--since", metavar="ISO")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_audit)

    workspace = commands.add_parser("workspace", help="list workspaces, set key limits, suspend")
    ws = workspace.add_subparsers(dest="workspace_command", required=True, metavar="ACTION")
    p = ws.add_parser("list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_workspace_list)
    p = ws.add_parser("set-limit", help="maximum active keys in a workspace")
    p.add_argument("workspace")
    p.add_argument("limit", type=int)
    p.set_defaults(handler=_workspace_limit)
    p = ws.add_parser("suspend", help="stop every key of a workspace until resumed")
    p.add_argument("workspace")
    p.add_argument("--reason")
    p.set_defaults(handler=_workspace_suspend)
    p = ws.add_parser("resume", help="resume a suspended workspace")
    p.add_argument("workspace")
    p.set_defaults(handler=_workspace_resume)

    p = commands.add_parser("serve", help="the admin HTTP API and web console ([admin] listen)")
    p.add_argument("--listen", metavar="HOST:PORT", help="instead of [admin] listen (port 0: any free)")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("backup", help="online, consistent copy of the keystore")
    p.add_argument("path")
    p.set_defaults(handler=_backup)
    return parser
