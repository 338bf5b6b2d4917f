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
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from keystore.keys import PepperError
from keystore.legacy import ACCEPTED
from keystore.models import PERMISSIONS, ROLES, AdminToken, AuthKey, Mailbox, review_flags
from keystore.opening import open_keystore, postgres_schema_version, where
from keystore.passwdfile import read_dovecot_passwd, read_htpasswd
from keystore.service import Actor, AdminService
from keystore.store import KeystoreUnavailable, StoreError, control_character
from relay.config import ConfigError, load_config, parse_duration, resolve_config_path

__all__ = ["main"]

EXIT_REFUSED, EXIT_USAGE = 1, 2


class Refused(Exception):
    """Raised by a command for exit status 1 with a one-line message."""


class UsageError(Exception):
    """Raised by a command for exit status 2: options that do not go together."""


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # everything this tool creates (db, pepper, backups) is private
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        # a PostgreSQL pool logs every failed connection attempt; a command that cannot reach
        # the keystore says so in its one line on stderr
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
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
    except (ValueError, UsageError) as exc:  # bad --ttl / --expires / --grace values
        print(f"keystore: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, config) -> int:
    ks = config.keystore
    if args.command == "init":
        return await _init(ks)
    # a command is one request at a time; `keystore serve` answers several at once
    store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file,
                                default_key_limit=ks.default_key_limit,
                                max_connections=8 if args.command == "serve" else 2)
    try:
        service = AdminService(store, route_names=config.route_names)
        return await args.handler(service, Actor.shell(_actor()), args, config)
    finally:
        await store.close()


async def _init(ks) -> int:
    """Create the keystore (a sqlite file, or the tables in a PostgreSQL database) and the
    pepper, or bring an existing one up to date; never a new pepper for existing keys."""
    existed = ks.path.exists() if ks.url is None else await postgres_schema_version(ks.url) > 0
    named = where(path=ks.path, url=ks.url)
    if existed and not ks.pepper_file.exists():
        raise Refused(
            f"{ks.pepper_file}: pepper file missing for the existing keystore {named}; "
            "restore it (a new pepper would make every key invalid)"
        )
    store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file,
                                default_key_limit=ks.default_key_limit, create=True,
                                max_connections=2)
    await store.close()
    state = "is up to date" if existed else "created"
    print(f"keystore {named} {state}; pepper {ks.pepper_file} (mode 0600)")
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
    for name in ("created", "expires", "rotated", "previous_valid_until", "last_used", "last_failed"):
        data[name] = _when(data[name]) if data[name] is not None else None
    return data


def _mailbox_json(mailbox: Mailbox) -> dict:
    data = dataclasses.asdict(mailbox)
    data["aliases"] = list(mailbox.aliases)
    data["created"] = _when(mailbox.created)
    data["suspended_at"] = _when(mailbox.suspended_at) if mailbox.suspended_at else None
    return data


def _printable(text: str) -> str:
    """Text others typed (key names, notes, suspension reasons: a limited admin token
    writes them over HTTP) as an owner's terminal should show it: each control character
    escaped (a note's line break is shown as \\n), so no escape sequence is obeyed."""
    return "".join(c.encode("unicode_escape").decode("ascii") if control_character(c) else c
                   for c in text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [["-" if c is None else _printable(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _show_key(key: AuthKey) -> None:
    fields = [
        ("id", key.id), ("name", key.name), ("status", key.status), ("scope", key.scope),
        ("kind", f"legacy password ({ACCEPTED.get(key.scheme or '', key.scheme)}), imported"
                 if key.legacy else "auth key"),
        ("replaced by key", key.replaced_by),
        ("permissions", " ".join(key.permissions)), ("owner", key.owner), ("note", key.note),
        ("route", key.route), ("rate limit", key.rate_limit),
        ("allowed from", " ".join(key.allow_from) or "anywhere"),
        ("created", _when(key.created)), ("expires", _when(key.expires)),
        ("rotated", _when(key.rotated)),
        ("old secret valid until", _when(key.previous_valid_until)),
        ("last used", _when(key.last_used)), ("last client", key.last_ip),
        ("last failed use", f"{_when(key.last_failed)} from {key.last_failed_ip} "
                            f"({key.last_failed_reason.replace('_', ' ')})" if key.last_failed else None),
    ]
    for label, value in fields:
        print(f"{label + ':':24}{'-' if value is None else _printable(str(value))}")


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
# Each command is thin over AdminService (keystore/service.py), as the HTTP API is: the
# same refusals, the same audit entries. The CLI's actor is the shell's user, an owner.


async def _mailbox_add(svc: AdminService, me: Actor, args, config) -> int:
    mailbox = await svc.add_mailbox(
        me, args.address, workspace=args.workspace, aliases=args.alias, route=args.route,
    )
    aliases = f" (aliases: {', '.join(mailbox.aliases)})" if mailbox.aliases else ""
    print(f"mailbox {mailbox.address} added to workspace {mailbox.workspace}{aliases}")
    return 0


async def _mailbox_list(svc: AdminService, me: Actor, args, config) -> int:
    mailboxes = await svc.mailboxes(me, args.workspace)
    if args.json:
        _print_json([_mailbox_json(m) for m in mailboxes])
        return 0
    _table(
        ["ADDRESS", "WORKSPACE", "STATUS", "KEYS", "WORKSPACE KEYS", "ALIASES", "SUSPENDED", "LEGACY"],
        [[m.address, m.workspace, m.status, m.keys, m.workspace_keys, " ".join(m.aliases) or None,
          f"{_when(m.suspended_at)} {m.suspended_reason or ''}".strip() if m.suspended_at else None,
          "password" if m.legacy_password else None]
         for m in mailboxes],
    )
    return 0


async def _mailbox_suspend(svc: AdminService, me: Actor, args, config) -> int:
    mailbox = await svc.suspend_mailbox(me, args.address, reason=args.reason)
    print(f"mailbox {mailbox.address} suspended; {mailbox.keys + mailbox.workspace_keys} key(s) "
          f"stop working for it until it is resumed ({mailbox.keys} mailbox key(s), "
          f"{mailbox.workspace_keys} workspace key(s) of {mailbox.workspace})")
    return 0


async def _mailbox_resume(svc: AdminService, me: Actor, args, config) -> int:
    mailbox = await svc.resume_mailbox(me, args.address)
    print(f"mailbox {mailbox.address} resumed")
    return 0


async def _mailbox_remove(svc: AdminService, me: Actor, args, config) -> int:
    deleted = await svc.remove_mailbox(me, args.address, force=args.force)
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


async def _key_create(svc: AdminService, me: Actor, args, config) -> int:
    key, secret = await svc.create_key(
        me, mailbox=args.mailbox, workspace=args.workspace, name=args.name, owner=args.owner,
        note=args.note, permissions=args.scope or ["email.send"], expires=_expiry(args),
        route=args.route, rate_limit=args.rate_limit, allow_from=args.allow_from or (),
    )
    _print_secret(key, secret, args, "created")
    return 0


def _flags(key: AuthKey, now: float) -> str | None:
    """The console's badges, in words (models.review_flags)."""
    return ",".join(review_flags(key, now)) or None


async def _key_list(svc: AdminService, me: Actor, args, config) -> int:
    found = await svc.keys(
        me, mailbox=args.mailbox, workspace=args.workspace, search=args.search, status=args.status,
        owner=args.owner, kind=args.kind,
        unused_for=parse_duration(args.unused_for) if args.unused_for else None,
        not_rotated_for=parse_duration(args.not_rotated_for) if args.not_rotated_for else None,
    )
    if args.json:
        _print_json([_key_json(k) for k in found])
        return 0
    now = time.time()
    _table(
        ["ID", "NAME", "STATUS", "SCOPE", "OWNER", "CREATED", "EXPIRES", "LAST USED", "ROTATED",
         "FLAGS"],
        [[k.id, k.name, k.status, k.scope, k.owner, _when(k.created), _when(k.expires),
          _when(k.last_used), _when(k.rotated), _flags(k, now)] for k in found],
    )
    return 0


async def _key_show(svc: AdminService, me: Actor, args, config) -> int:
    key = await svc.key(me, args.id)
    if args.json:
        _print_json(_key_json(key))
    else:
        _show_key(key)
    return 0


async def _key_status(svc: AdminService, me: Actor, args, config) -> int:
    change = {"disable": svc.disable_key, "enable": svc.enable_key}
    key = await change[args.key_command](me, args.id)
    print(f"key {key.id} ({key.name!r}) is now {key.status}")
    return 0


async def _key_revoke(svc: AdminService, me: Actor, args, config) -> int:
    # `is not None`: `--owner ""` is a choice, refused by the service in its own words
    chosen = [name for name in ("id", "owner", "mailbox") if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise UsageError("key revoke: give one of: a key ID, --owner WHO, --mailbox ADDRESS")
    if args.id is not None:
        key = await svc.revoke_key(me, args.id)
        print(f"key {key.id} ({key.name!r}) is now {key.status}")
        return 0
    if not args.yes:
        pending = [k for k in await svc.keys(me, owner=args.owner) if k.status != "revoked"] \
            if args.owner is not None else [k for k in await svc.keys(me, mailbox=args.mailbox)
                                if k.status != "revoked" and k.mailbox is not None]
        if pending:
            # the question goes to stderr: stdout stays the answer's (--json included)
            print(f"These {len(pending)} key(s) will be revoked, for good:", file=sys.stderr)
            for key in pending:
                print(f"  {key.id}  {_printable(key.name)}  ({key.scope})", file=sys.stderr)
            print("Type 'revoke' to confirm: ", end="", flush=True, file=sys.stderr)
            if sys.stdin.readline().strip() != "revoke":
                raise Refused("not confirmed; nothing revoked")
    revoked = await svc.revoke_keys(me, owner=args.owner, mailbox=args.mailbox)
    if args.json:
        _print_json([_key_json(k) for k in revoked])
        return 0
    for key in revoked:
        print(f"key {key.id} ({key.name!r}) is now revoked")
    print(f"{len(revoked)} key(s) revoked")
    return 0


async def _key_update(svc: AdminService, me: Actor, args, config) -> int:
    changes: dict[str, object] = {}
    for name in args.clear or ():
        changes[name.replace("-", "_")] = None
    given = {
        "route": args.route, "rate_limit": args.rate_limit, "owner": args.owner, "note": args.note,
        "allow_from": args.allow_from, "expires": _expiry(args),
    }
    for name, value in given.items():
        if value is not None:
            if name in changes:
                raise UsageError(f"key update: --{name.replace('_', '-')} and --clear "
                                 f"{name.replace('_', '-')} together")
            changes[name] = value
    if not changes:
        raise UsageError("key update: nothing to change (give --route, --rate-limit, --expires or "
                         "--ttl, --owner, --note, --allow-from, or --clear SETTING)")
    key = await svc.update_key(me, args.id, changes)
    if args.json:
        _print_json(_key_json(key))
        return 0
    print(f"key {key.id} ({key.name!r}) updated: "
          + ", ".join(f"{name.replace('_', '-')} {_setting(getattr(key, name))}" for name in changes))
    return 0


def _setting(value: object) -> str:
    if value is None or value == ():
        return "cleared"
    if isinstance(value, tuple):
        return " ".join(value)
    if isinstance(value, float):
        return _when(value)
    return _printable(str(value))


async def _key_rotate(svc: AdminService, me: Actor, args, config) -> int:
    if args.end_grace:
        key = await svc.end_rotation_grace(me, args.id)
        if args.json:
            print(json.dumps(_key_json(key), indent=2))
        else:
            print(f"key {key.id} ({key.name!r}): the previous secret no longer works (grace ended)")
        return 0
    grace = parse_duration(args.grace) if args.grace else 0.0
    key, secret = await svc.rotate_key(me, args.id, grace=grace)
    _print_secret(key, secret, args, "rotated")
    if not args.json:
        until = _when(key.previous_valid_until) if grace else "no longer (stopped now)"
        print(f"The previous secret is valid until: {until}")
    return 0


async def _key_delete(svc: AdminService, me: Actor, args, config) -> int:
    key = await svc.key(me, args.id)
    answer = key.name
    if not args.yes:
        print(f"Deleting key {key.id} cannot be undone. Type its name ({_printable(key.name)}) to confirm: ",
              end="", flush=True, file=sys.stderr)
        answer = sys.stdin.readline().strip()
    await svc.delete_key(me, key.id, confirm=answer)
    print(f"key {key.id} ({key.name!r}) deleted")
    return 0


async def _audit(svc: AdminService, me: Actor, args, config) -> int:
    events = await svc.audit(
        me, key_id=args.key, mailbox=args.mailbox,
        since=parse_iso(args.since) if args.since else None,
    )
    if args.json:
        _print_json([{**dataclasses.asdict(e), "at": _when(e.at)} for e in events])
        return 0
    _table(["WHEN", "ACTOR", "ACTION", "KEY", "MAILBOX", "DETAIL"],
           [[_when(e.at), e.actor, e.action, e.key_id, e.mailbox, e.detail] for e in events])
    return 0


async def _workspace_list(svc: AdminService, me: Actor, args, config) -> int:
    spaces = await svc.workspaces(me)
    if args.json:
        _print_json([{**dataclasses.asdict(w), "suspended_at": _when(w.suspended_at)
                      if w.suspended_at else None} for w in spaces])
        return 0
    _table(["WORKSPACE", "STATUS", "MAILBOXES", "ACTIVE KEYS", "KEY LIMIT", "SUSPENDED"],
           [[w.name, w.status, w.mailboxes, w.active_keys, w.key_limit,
             f"{_when(w.suspended_at)} {w.suspended_reason or ''}".strip() if w.suspended_at else None]
            for w in spaces])
    return 0


async def _workspace_suspend(svc: AdminService, me: Actor, args, config) -> int:
    mailbox_keys, workspace_keys = await svc.suspend_workspace(me, args.workspace, reason=args.reason)
    print(f"workspace {args.workspace} suspended; its {mailbox_keys + workspace_keys} key(s) "
          f"({mailbox_keys} mailbox key(s), {workspace_keys} workspace key(s)) stop working "
          "until it is resumed")
    return 0


async def _workspace_resume(svc: AdminService, me: Actor, args, config) -> int:
    await svc.resume_workspace(me, args.workspace)
    print(f"workspace {args.workspace} resumed")
    return 0


async def _workspace_limit(svc: AdminService, me: Actor, args, config) -> int:
    await svc.set_key_limit(me, args.workspace, args.limit)
    print(f"workspace {args.workspace}: at most {args.limit} active keys")
    return 0


def _token_json(token: AdminToken) -> dict:
    data = dataclasses.asdict(token)
    data["workspaces"] = list(token.workspaces)
    for name in ("created", "last_used", "revoked_at"):
        data[name] = _when(data[name]) if data[name] is not None else None
    return data


async def _token_create(svc: AdminService, me: Actor, args, config) -> int:
    token, secret = await svc.create_token(me, name=args.name, role=args.role,
                                           workspaces=args.workspace, replace=args.replace)
    if args.json:
        _print_json({**_token_json(token), "secret": secret})
        return 0
    where = ", ".join(token.workspaces) if token.workspaces else "every workspace"
    print(f"created admin token {token.id} ({token.name!r}, {token.role} of {where})")
    print()
    print(f"    {secret}")
    print()
    print("This is the only time the token is shown. Use it as 'Authorization: Bearer ...' or")
    print("paste it into the console's login page.")
    return 0


async def _token_list(svc: AdminService, me: Actor, args, config) -> int:
    tokens = await svc.tokens(me)
    if args.json:
        _print_json([_token_json(t) for t in tokens])
        return 0
    _table(["ID", "NAME", "ROLE", "WORKSPACES", "STATUS", "CREATED", "BY", "LAST USED", "LAST CLIENT"],
           [[t.id, t.name, t.role, " ".join(t.workspaces) or "all", t.status, _when(t.created),
             t.created_by, _when(t.last_used), t.last_ip] for t in tokens])
    return 0


async def _token_revoke(svc: AdminService, me: Actor, args, config) -> int:
    token = await svc.revoke_token(me, args.id)
    print(f"admin token {token.id} ({token.name!r}) revoked; its console sessions end now")
    return 0


async def _import(svc: AdminService, me: Actor, args, config) -> int:
    """`keystore import dovecot-passwd|htpasswd FILE`: legacy passwords (issue 13)."""
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as exc:
        raise Refused(f"{args.file}: {exc.strerror or exc}") from None
    text = data.decode("utf-8", "surrogateescape")  # a line that is not UTF-8 is one bad line
    read = read_dovecot_passwd if args.format == "dovecot-passwd" else read_htpasswd
    entries, problems = read(text, domain=args.domain)
    # a file name is bytes; one that is not UTF-8 (read as surrogates) could not be stored
    source = "stdin" if args.file == "-" else os.fsencode(args.file).decode("utf-8", "backslashreplace")
    if not entries and not problems:
        raise Refused(f"{source}: no users in it (expected {args.format} lines)")
    report = await svc.import_legacy(me, entries, source=f"{args.format}:{source}", workspace=args.workspace,
                                     problems=problems, skip_bad=args.skip_bad, dry_run=args.dry_run)
    if args.json:
        _print_json({**dataclasses.asdict(report), "problems": [str(p) for p in report.problems],
                     "dry_run": args.dry_run})
        return 0
    for problem in report.problems:
        print(f"keystore: skipped {problem}", file=sys.stderr)
    verb = "would import" if args.dry_run else "imported"
    print(f"{verb} from {source}: {len(report.created)} legacy password(s) created, "
          f"{len(report.updated)} updated, {len(report.unchanged)} unchanged, "
          f"{len(report.mailboxes_created)} new mailbox(es)"
          + (f", {len(report.problems)} line(s) skipped" if report.problems else ""))
    if report.retired:
        print(f"not given back (retired here already): {', '.join(report.retired)}")
    if args.dry_run:
        print("dry run: nothing was changed")
    else:
        print("Users log in with their mailbox address and their old password; "
              "`keystore legacy list` shows who still does.")
    return 0


async def _legacy_list(svc: AdminService, me: Actor, args, config) -> int:
    found = await svc.legacy_passwords(me, workspace=args.workspace)
    now = time.time()
    if not args.all:
        found = [k for k in found if k.status != "revoked"]
    if args.json:
        _print_json([{**_key_json(k), "state": k.legacy_state(now)} for k in found])
        return 0
    _table(["MAILBOX", "ID", "SCHEME", "STATE", "DEADLINE", "LAST USED", "LAST CLIENT", "NEW KEY"],
           [[k.mailbox, k.id, ACCEPTED.get(k.scheme or "", k.scheme), k.legacy_state(now),
             _when(k.expires), _when(k.last_used), k.last_ip, k.replaced_by] for k in found])
    return 0


async def _legacy_expire(svc: AdminService, me: Actor, args, config) -> int:
    deadline = (time.time() + parse_duration(args.after)) if args.after else parse_iso(args.at)
    if deadline <= time.time():  # the store's words ("expiry is in the past") are a key's
        raise Refused(f"the deadline {_when(deadline)} is in the past; give a later --at, or --after "
                      "DURATION")
    changed = await svc.expire_legacy(me, deadline, workspace=args.workspace, mailbox=args.mailbox)
    if args.json:
        _print_json([_key_json(k) for k in changed])
        return 0
    print(f"{len(changed)} legacy password(s) stop working at {_when(deadline)}; after that, their "
          "users are told to use an auth key")
    return 0


async def _legacy_convert(svc: AdminService, me: Actor, args, config) -> int:
    legacy, key, secret = await svc.convert_legacy(me, args.mailbox, name=args.name)
    _print_secret(key, secret, args, "created")
    if not args.json:
        print(f"The legacy password ({legacy.id}) keeps working until this key is first used; "
              "then it is retired.")
    return 0


async def _serve(svc: AdminService, me: Actor, args, config) -> int:
    from keystore.http import serve  # the HTTP stack loads only for this command

    return await serve.run(svc.store, config, listen=args.listen)


async def _backup(svc: AdminService, me: Actor, args, config) -> int:
    await svc.backup(me, Path(args.path))
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
    p = key.add_parser("list", help="list and search keys; reports of unused and unrotated keys")
    p.add_argument("--mailbox", metavar="A", help="every key able to send as A (its own and its "
                   "workspace's)")
    p.add_argument("--workspace", metavar="W")
    p.add_argument("--search", metavar="TEXT", help="in name, owner, note, mailbox, workspace")
    p.add_argument("--owner", metavar="WHO")
    p.add_argument("--status", metavar="S", choices=["active", "disabled", "revoked"])
    p.add_argument("--kind", choices=["key", "legacy"],
                   help="auth keys only, or imported legacy passwords only (FLAGS marks them 'legacy')")
    p.add_argument("--unused-for", metavar="DURATION",
                   help="active keys not used for this long (e.g. 30d), never-used ones from creation")
    p.add_argument("--not-rotated-for", metavar="DURATION",
                   help="active keys whose secret is this old (e.g. 90d)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_list)
    p = key.add_parser("show", help="show one key")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_show)
    for action, text in (("disable", "stop a key (reversible)"), ("enable", "re-enable a key")):
        p = key.add_parser(action, help=text)
        p.add_argument("id")
        p.set_defaults(handler=_key_status)
    p = key.add_parser("revoke", help="revoke a key (or every key of an owner or a mailbox), "
                       "immediately and for good")
    p.add_argument("id", nargs="?")
    p.add_argument("--owner", metavar="WHO", help="every key of this owner (a contractor leaves)")
    p.add_argument("--mailbox", metavar="ADDRESS",
                   help="every key of this mailbox (not its workspace's keys)")
    p.add_argument("--yes", action="store_true", help="with --owner / --mailbox: do not ask")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_revoke)
    p = key.add_parser("update", help="change a key's route, rate limit, expiry, owner, note or "
                       "client networks (its name stays)")
    p.add_argument("id")
    p.add_argument("--route", metavar="NAME")
    p.add_argument("--rate-limit", type=int, metavar="N", help="messages per minute")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", metavar="ISO-DATE")
    expiry.add_argument("--ttl", metavar="DURATION", help="from now, e.g. 30d")
    p.add_argument("--owner", metavar="WHO")
    p.add_argument("--note")
    p.add_argument("--allow-from", action="append", metavar="CIDR",
                   help="replaces the key's client networks; repeatable, IPv4 or IPv6")
    p.add_argument("--clear", action="append", metavar="SETTING",
                   choices=["route", "rate-limit", "expires", "owner", "note", "allow-from"],
                   help="unset one (repeatable): route, rate-limit, expires, owner, note, allow-from "
                        "(allow-from: from anywhere again)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_key_update)
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

    token = commands.add_parser("admin-token", help="tokens for the HTTP API and console").add_subparsers(
        dest="token_command", required=True, metavar="ACTION")
    p = token.add_parser("create", help="create an admin token (its secret is shown once)")
    p.add_argument("--name", required=True, help="who or what uses it, e.g. 'provisioning'")
    p.add_argument("--role", required=True, choices=ROLES,
                   help="viewer: reads; editor: manages keys and mailboxes; owner: everything")
    p.add_argument("--workspace", action="append", default=[], metavar="W",
                   help="limit a viewer or editor to this workspace (repeatable); default: all")
    p.add_argument("--replace", action="store_true",
                   help="revoke the active tokens of the same name first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_token_create)
    p = token.add_parser("list", help="list admin tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_token_list)
    p = token.add_parser("revoke", help="revoke an admin token")
    p.add_argument("id")
    p.set_defaults(handler=_token_revoke)

    p = commands.add_parser("serve", help="the admin HTTP API and web console ([admin] listen)")
    p.add_argument("--listen", metavar="HOST:PORT", help="instead of [admin] listen (port 0: any free)")
    p.set_defaults(handler=_serve)

    p = commands.add_parser("import", help="import legacy passwords from Dovecot or htpasswd "
                            "(moving in from Postfix + Dovecot)")
    p.add_argument("format", choices=["dovecot-passwd", "htpasswd"])
    p.add_argument("file", help="the password file ('-': standard input)")
    p.add_argument("--workspace", metavar="W",
                   help="for the mailboxes it creates (default: a workspace named after each domain)")
    p.add_argument("--domain", metavar="D", help="for users written without one (alice -> alice@D)")
    p.add_argument("--skip-bad", action="store_true",
                   help="import the good lines even if some are refused (default: nothing is imported)")
    p.add_argument("--dry-run", action="store_true", help="report what would be done; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_import)

    legacy = commands.add_parser("legacy", help="imported legacy passwords: who uses them, "
                                 "deadlines, conversion to keys").add_subparsers(
        dest="legacy_command", required=True, metavar="ACTION")
    p = legacy.add_parser("list", help="legacy passwords with their last use and client address")
    p.add_argument("--workspace", metavar="W")
    p.add_argument("--all", action="store_true", help="retired ones too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_legacy_list)
    p = legacy.add_parser("expire", help="a deadline after which legacy passwords stop working")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--after", metavar="DURATION", help="from now, e.g. 30d")
    when.add_argument("--at", metavar="ISO-DATE")
    p.add_argument("--workspace", metavar="W")
    p.add_argument("--mailbox", metavar="ADDRESS")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_legacy_expire)
    p = legacy.add_parser("convert", help="give a mailbox a key; its password is retired at the "
                          "key's first use")
    p.add_argument("mailbox")
    p.add_argument("--name", default="converted from legacy password",
                   help="the new key's name: the tool that will use it (e.g. 'Thunderbird')")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_legacy_convert)

    p = commands.add_parser("backup", help="online, consistent copy of the keystore")
    p.add_argument("path")
    p.set_defaults(handler=_backup)
    return parser
