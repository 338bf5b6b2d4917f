"""KeyStore: the one async interface to workspaces, mailboxes, auth keys and the audit log.

Everything the relay and the CLI do with credentials goes through this class. It holds
every rule and every statement; the engine behind it is a small adapter (keystore/sqldb.py's
Database): sqlite (keystore/sqlitedb.py, the default) or PostgreSQL (keystore/postgresdb.py,
several relays on one keystore), opened by keystore/opening.py. The statements are written
once, in the SQL both engines read alike.

`authenticate` is on the hot path (every AUTH). It reads through the adapter's `read` (on
sqlite a connection of its own: writes, such as the last-use bookkeeping, may wait for the
database lock; a login never waits behind them). It is one SELECT that always returns a row,
whether or not the key and the mailbox exist, and it always computes the HMAC and compares
it in constant time, so an unknown mailbox, an unknown key and a wrong secret cost the
same and answer the same `bad_credentials`. Reasons such as `revoked` are only given when
the presented secret is right: the caller already holds the key, so nothing leaks.

A login's Identity carries the keyed hash of the secret it presented, so `recheck` can end
a session whose secret was rotated away (`rotated`: at once without a grace, else when
the grace ends) while sessions on the new secret go on.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

from keystore import keys, networks
from keystore.errors import Conflict, KeystoreUnavailable, NotFound, StoreError
from keystore.legacy import ACCEPTED, LEGACY_FAILURE_FLOOR, BadLine, LegacyEntry, LegacyVerifier
from keystore.legacy import fingerprint as legacy_fingerprint
from keystore.models import (
    PERMISSIONS,
    ROLES,
    AdminToken,
    AuditEvent,
    AuthKey,
    Identity,
    Mailbox,
    Reason,
    Workspace,
    canonical_address,
)
from keystore.sqldb import Database, Executor
from keystore.sqlitedb import SqliteDatabase

__all__ = ["Conflict", "KeyStore", "KeystoreUnavailable", "LegacyImport", "NotFound", "StoreError",
           "normalize_address"]

# no control characters in the local part: a NUL, which AUTH LOGIN's username may carry,
# is no text PostgreSQL can compare (the login would fail as "keystore unavailable")
_ADDRESS_RE = re.compile(r"^[^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]+@[A-Za-z0-9.-]+\.?[A-Za-z0-9-]*$")
_DUMMY_HASH = bytes(32)
# A new workspace's name: it appears in URLs (/api/v1/workspaces/NAME, the console), table
# output and audit details, so nothing that a path, a terminal or a log line reads apart
_WORKSPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
USE_FLUSH_DELAY = 1.0  # seconds a key's last use may take to reach the database
_KEY_STATUSES = ("active", "disabled", "revoked")
_LIKE_SPECIAL = re.compile(r"[\\%_]")  # what a LIKE pattern would read as more than itself
# What `update_key` may change (a key's name stays as created: it is how people find it in
# the audit trail); a value of None clears the setting.
KEY_SETTINGS = ("route", "rate_limit", "expires", "owner", "note", "allow_from")
TOKEN_USE_WRITE_INTERVAL = 60.0  # seconds between writes of one admin token's last use
# A rate limit past this means nothing (and sqlite's integers end at 2**63): refused, not stored.
MAX_RATE_LIMIT = 1_000_000
MAX_KEY_LIMIT = 2**31 - 1
# 9999-12-31T23:59:59Z: a later expiry has no date to show it in (every listing would fail).
LATEST_EXPIRY = 253402300799.0
MAX_GRACE = 3650 * 86400.0  # a rotation grace of ten years is no rotation at all
# Characters at most, of the text a person types about a key (the console's fields agree).
_TEXT_LIMITS = {"name": 200, "owner": 200, "route": 200, "note": 2000}
# Bidirectional overrides and isolates: they reorder what a terminal or page shows.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def normalize_address(address: str) -> str:
    """A valid address in its canonical form (models.canonical_address)."""
    address = address.strip()
    if not _ADDRESS_RE.match(address) or len(address) > 254:
        raise StoreError(f"invalid mailbox address: {address!r}")
    return canonical_address(address)


_AUTH_COLUMNS = """
SELECT k.id, k.status, k.expires, k.secret_hash, k.prev_hash, k.prev_valid_until,
       k.permissions, k.route, k.mailbox_id, k.workspace_id, k.rate_limit,
       m.id, m.address, CASE WHEN w.status = 'suspended' THEN 'suspended' ELSE m.status END,
       m.workspace_id, m.route, w.name,
       (SELECT group_concat(a.address, ' ') FROM alias a WHERE a.mailbox_id = m.id),
       k.allow_from, k.kind
"""
_AUTH_SQL = _AUTH_COLUMNS + """
FROM (SELECT ? AS kid, ? AS address) q
LEFT JOIN auth_key k ON k.id = q.kid
LEFT JOIN mailbox m ON m.address = q.address
LEFT JOIN workspace w ON w.id = m.workspace_id
"""
# A login with a password that is not key-shaped: the mailbox's legacy password (its live
# one, else its newest retired one: the right password then hears "use an auth key"), and
# whether the keystore holds any legacy password at all (if not, a refusal need not be
# padded to legacy.LEGACY_FAILURE_FLOOR: there is no hash whose time could tell anything).
_LEGACY_SQL = _AUTH_COLUMNS + """,
       k.scheme, k.password_hash,
       EXISTS (SELECT 1 FROM auth_key l WHERE l.kind = 'legacy')
FROM (SELECT ? AS address) q
LEFT JOIN mailbox m ON m.address = q.address
LEFT JOIN auth_key k ON k.id = (SELECT l.id FROM auth_key l WHERE l.mailbox_id = m.id
                                AND l.kind = 'legacy' ORDER BY l.status = 'revoked', l.created DESC
                                LIMIT 1)
LEFT JOIN workspace w ON w.id = m.workspace_id
"""

_KEY_SQL = """
SELECT k.id, k.name, k.owner, k.note, w.name, m.address, k.permissions, k.status, k.created,
       k.expires, k.rotated, k.prev_valid_until, k.last_used, k.last_ip, k.route, k.rate_limit,
       k.allow_from, k.last_failed, k.last_failed_ip, k.last_failed_reason, k.kind, k.scheme,
       k.replaced_by
FROM auth_key k JOIN workspace w ON w.id = k.workspace_id
LEFT JOIN mailbox m ON m.id = k.mailbox_id
"""

_MAILBOX_SQL = """
SELECT m.address, w.name,
       (SELECT group_concat(a.address, ' ') FROM alias a WHERE a.mailbox_id = m.id),
       m.status, m.suspended_reason, m.suspended_at, m.route, m.created,
       (SELECT count(*) FROM auth_key k WHERE k.mailbox_id = m.id AND k.kind = 'key'),
       (SELECT count(*) FROM auth_key k WHERE k.mailbox_id IS NULL AND k.workspace_id = w.id),
       EXISTS (SELECT 1 FROM auth_key k WHERE k.mailbox_id = m.id AND k.kind = 'legacy'
               AND k.status != 'revoked')
FROM mailbox m JOIN workspace w ON w.id = m.workspace_id
"""


class KeyStore:
    """Async access to the keystore. Open with `await KeyStore.open(...)`, then `close()`."""

    def __init__(self, db: Database, pepper: bytes, default_key_limit: int) -> None:
        self._db = db
        self._pepper = pepper
        self._default_key_limit = default_key_limit
        self._uses: dict[str, tuple[float, str]] = {}
        self._failures: dict[str, tuple[float, str, str]] = {}
        self._use_flusher: asyncio.Task[None] | None = None
        self.legacy = LegacyVerifier()  # the relay sizes it ([auth] legacy_*: configure_legacy)

    @classmethod
    async def open(
        cls, path: Path, pepper_file: Path, *, default_key_limit: int = 100, create: bool = False
    ) -> KeyStore:
        """The sqlite keystore at `path` (keystore/opening.py opens either engine)."""
        if create and not pepper_file.exists():
            if path.exists():  # a new pepper would silently make every existing key invalid
                raise keys.PepperError(
                    f"{pepper_file}: pepper file missing for the existing keystore {path}; restore it"
                )
            try:
                keys.create_pepper(pepper_file)
            except FileExistsError:
                pass  # a concurrent `keystore init` wrote it first: use that one
        pepper = keys.load_pepper(pepper_file)
        return cls(await SqliteDatabase.open(path, create=create), pepper, default_key_limit)

    async def close(self) -> None:
        if self._use_flusher is not None:
            self._use_flusher.cancel()
        await self.flush_uses()
        self.legacy.close()
        await self._db.close()

    def configure_legacy(self, *, workers: int, queue: int,
                         observer: Callable[[str, str], None] | None = None) -> None:
        """How many legacy-password verifications may run at once, and wait (legacy.py)."""
        self.legacy.configure(workers=workers, queue=queue, observer=observer)

    async def _rows(self, sql: str, params: Iterable[object] = (), *, login: bool = False) -> list[tuple]:
        """One statement's rows; `login`: on the login path's read (see the docstring)."""
        if login:
            return await self._db.read(sql, tuple(params))
        return await self._db.fetch(sql, tuple(params))

    def _transaction(self) -> AbstractAsyncContextManager[Executor]:
        """One write transaction; writers (in any process, on any node) take turns."""
        return self._db.transaction()

    # ---------------------------------------------------------------- logins

    async def authenticate(self, username: str, secret: str, client_ip: str, *,
                           slow_ok: bool = True) -> Identity | Reason:
        """Decide one login: the identity, or why not (see the module docstring). A secret
        that is not key-shaped is checked as the mailbox's legacy password, if it has one;
        `slow_ok=False` (an address over its AUTH ceiling): only against the legacy cache,
        never by computing a hash."""
        parsed = keys.parse_key(secret)
        try:
            address = normalize_address(username)
        except StoreError:
            address = ""
        if parsed is None:
            return await self._authenticate_legacy(address, secret, client_ip, slow_ok)
        (row,) = await self._rows(_AUTH_SQL, (parsed.key_id, address), login=True)
        now = time.time()
        presented = keys.hash_secret(self._pepper, parsed.key_id, parsed.secret)
        if not _secret_valid(row, presented, now) or row[0] is None or row[19] != "key":
            return Reason.BAD_CREDENTIALS
        return self._settle(row, now, presented, client_ip)

    async def _authenticate_legacy(self, address: str, password: str, client_ip: str,
                                   slow_ok: bool) -> Identity | Reason:
        """A legacy password (legacy.py). The hash is checked off the event loop, at most
        so many at once (LegacyBusy, a KeystoreUnavailable: 454, try later); a refusal is
        answered no sooner than LEGACY_FAILURE_FLOOR after the AUTH whenever the keystore
        holds legacy passwords, so the time of a 535 does not tell which mailboxes have one."""
        started = time.monotonic()
        (row,) = await self._rows(_LEGACY_SQL, (address,), login=True)
        fingerprint = bytes(row[3]) if row[3] is not None else _DUMMY_HASH
        if row[0] is not None:
            matched = bool(password) and await self.legacy.verify(
                row[0], fingerprint, row[20], row[21], password, slow_ok=slow_ok)
        else:
            matched = False
            if password and row[22]:  # a full pool answers 454 whether the mailbox has one or not
                await self.legacy.wait_without_credential(password, slow_ok=slow_ok)
        if matched:
            return self._settle(row, time.time(), fingerprint, client_ip)
        if row[22]:
            await asyncio.sleep(started + LEGACY_FAILURE_FLOOR - time.monotonic())
        return Reason.BAD_CREDENTIALS

    def _settle(self, row: tuple, now: float, presented: bytes, client_ip: str) -> Identity | Reason:
        """The verdict on a login whose secret (or password) was right, noted as the
        credential's last use or last failed use."""
        outcome = self._judge(row, now, presented, client_ip)
        if isinstance(outcome, Identity):
            self._remember_use(row[0], now, client_ip)
        elif outcome is not Reason.BAD_CREDENTIALS:
            # the right secret, refused (revoked, from outside its allow-from, ...): the
            # key's owner sees it as the key's last failed use
            self._remember_use(row[0], now, client_ip, failed=outcome)
        return outcome

    async def recheck(self, identity: Identity) -> Identity | Reason:
        """Re-read an authenticated session's key and mailbox (done at every MAIL FROM) so a
        key revoked, a mailbox suspended or the session's secret rotated away while a
        connection stays open stops at once."""
        (row,) = await self._rows(_AUTH_SQL, (identity.key_id, identity.mailbox), login=True)
        if row[0] is None:  # deleted since login; a password's user has no key to be told of
            return Reason.PASSWORD_RETIRED if identity.legacy else Reason.REVOKED
        now = time.time()
        outcome = self._judge(row, now, identity.secret_hash, identity.client_ip)
        if isinstance(outcome, Identity) and not _secret_valid(row, identity.secret_hash, now):
            return Reason.PASSWORD_CHANGED if outcome.legacy else Reason.ROTATED
        return outcome

    @staticmethod
    def _judge(row: tuple, now: float, secret_hash: bytes, client_ip: str) -> Identity | Reason:
        (key_id, status, expires, _, _, _, perms, key_route, key_mailbox, key_ws, rate_limit,
         mailbox_id, address, mailbox_status, mailbox_ws, mailbox_route, ws_name, aliases,
         allow_from, kind) = row[:20]
        in_scope = mailbox_id is not None and (
            key_mailbox == mailbox_id if key_mailbox is not None else key_ws == mailbox_ws
        )
        if not in_scope:
            return Reason.BAD_CREDENTIALS
        permissions = frozenset(perms.split())
        legacy = kind == "legacy"
        if legacy and (status != "active" or (expires is not None and now >= expires)):
            return Reason.PASSWORD_RETIRED  # the reply points to auth keys
        if status == "revoked":
            return Reason.REVOKED
        if status == "disabled":
            return Reason.DISABLED
        if expires is not None and now >= expires:
            return Reason.EXPIRED
        if mailbox_status != "active":
            return Reason.SUSPENDED
        if "email.send" not in permissions:
            return Reason.NO_SEND_PERMISSION
        if not networks.address_allowed(key_id, allow_from, client_ip):
            return Reason.NOT_ALLOWED_FROM
        return Identity(
            mailbox=address,
            key_id=key_id,
            workspace=ws_name,
            permissions=permissions,
            aliases=tuple(aliases.split()) if aliases else (),
            route=key_route or mailbox_route,
            rate_limit=rate_limit,
            secret_hash=secret_hash,
            client_ip=client_ip,
            legacy=legacy,
        )

    def _remember_use(
        self, key_id: str, now: float, client_ip: str, failed: Reason | None = None,
    ) -> None:
        """Last use is bookkeeping, not part of the decision: logins only note it, and one
        write per USE_FLUSH_DELAY records them all, so a login is a single read. Reads of
        key records through this store flush first; other processes see it that much later."""
        if failed is None:
            self._uses[key_id] = (now, client_ip)
        else:
            self._failures[key_id] = (now, client_ip, failed.value)
        if self._use_flusher is None:
            self._use_flusher = asyncio.ensure_future(self._flush_uses_later())

    async def _flush_uses_later(self) -> None:
        try:
            await asyncio.sleep(USE_FLUSH_DELAY)
        finally:
            self._use_flusher = None
        await self.flush_uses()

    async def flush_uses(self) -> None:
        uses, self._uses = self._uses, {}
        failures, self._failures = self._failures, {}
        if not uses and not failures:
            return
        try:
            await self._db.executemany(
                "UPDATE auth_key SET last_used = ?, last_ip = ? WHERE id = ?",
                [(when, ip, key_id) for key_id, (when, ip) in uses.items()],
            )
            await self._db.executemany(
                "UPDATE auth_key SET last_failed = ?, last_failed_ip = ?, last_failed_reason = ? "
                "WHERE id = ?",
                [(when, ip, reason, key_id) for key_id, (when, ip, reason) in failures.items()],
            )
            if uses:
                await self._retire_converted()
        except (KeystoreUnavailable, Conflict):
            pass  # last-use bookkeeping must never turn a valid login into a failure

    # ------------------------------------------------------------- mailboxes

    async def _workspace_id(self, conn: Executor, name: str, *, create: bool) -> int:
        rows = await conn.fetch("SELECT id FROM workspace WHERE name = ?", (name,))
        if rows:
            return rows[0][0]
        if not create:
            raise NotFound(f"unknown workspace: {name}")
        if not _WORKSPACE_RE.match(name):
            raise StoreError(f"invalid workspace name {name!r}: use letters, digits, '.', '_' and '-' "
                             "(at most 64, starting with a letter or digit)")
        return await conn.insert_returning_id(
            "INSERT INTO workspace (name, key_limit, created) VALUES (?, ?, ?)",
            (name, self._default_key_limit, time.time()),
        )

    async def _mailbox_id(self, conn: Executor, address: str) -> int:
        rows = await conn.fetch(
            "SELECT id FROM mailbox WHERE address = ?", (normalize_address(address),)
        )
        if not rows:
            raise NotFound(f"unknown mailbox: {address}")
        return rows[0][0]

    async def add_mailbox(
        self, address: str, *, workspace: str, aliases: Iterable[str] = (),
        route: str | None = None, actor: str,
    ) -> Mailbox:
        address = normalize_address(address)
        alias_list = sorted({normalize_address(a) for a in aliases} - {address})
        route = _check_setting("route", route)  # type: ignore[assignment]
        if not workspace.strip():
            raise StoreError("workspace name must not be empty")
        async with self._transaction() as conn:
            taken = await conn.fetch(
                "SELECT address FROM mailbox WHERE address IN ({0}) UNION "
                "SELECT address FROM alias WHERE address IN ({0})".format(
                    ",".join("?" * (len(alias_list) + 1))
                ),
                (address, *alias_list) * 2,
            )
            if taken:
                raise Conflict(f"address already in use: {taken[0][0]}")
            ws_id = await self._workspace_id(conn, workspace, create=True)
            mailbox_id = await conn.insert_returning_id(
                "INSERT INTO mailbox (address, workspace_id, route, created) VALUES (?, ?, ?, ?)",
                (address, ws_id, route, time.time()),
            )
            await conn.executemany(
                "INSERT INTO alias (address, mailbox_id) VALUES (?, ?)",
                [(a, mailbox_id) for a in alias_list],
            )
            detail = f"workspace={workspace}" + (f" aliases={','.join(alias_list)}" if alias_list else "")
            await self._audit(conn, actor, "mailbox.add", mailbox=address, detail=detail)
        return await self.get_mailbox(address)

    async def get_mailbox(self, address: str) -> Mailbox:
        rows = await self._rows(_MAILBOX_SQL + " WHERE m.address = ?", (normalize_address(address),))
        if not rows:
            raise NotFound(f"unknown mailbox: {address}")
        return _mailbox(rows[0])

    async def list_mailboxes(self, workspace: str | None = None) -> list[Mailbox]:
        sql, params = _MAILBOX_SQL, []
        if workspace is not None:
            sql += " WHERE w.name = ?"
            params.append(workspace)
        return [_mailbox(r) for r in await self._rows(sql + " ORDER BY m.address", params)]

    async def suspend_mailbox(self, address: str, *, reason: str | None, actor: str) -> Mailbox:
        return await self._set_mailbox_status(address, "suspended", reason, actor)

    async def resume_mailbox(self, address: str, *, actor: str) -> Mailbox:
        return await self._set_mailbox_status(address, "active", None, actor)

    async def _set_mailbox_status(
        self, address: str, status: str, reason: str | None, actor: str
    ) -> Mailbox:
        address = normalize_address(address)
        async with self._transaction() as conn:
            mailbox_id = await self._mailbox_id(conn, address)
            rows = await conn.fetch("SELECT status FROM mailbox WHERE id = ?", (mailbox_id,))
            if rows[0][0] == status:
                raise Conflict(f"mailbox {address} is already {status}")
            await conn.execute(
                "UPDATE mailbox SET status = ?, suspended_reason = ?, suspended_at = ? WHERE id = ?",
                (status, reason, time.time() if status == "suspended" else None, mailbox_id),
            )
            action = "mailbox.suspend" if status == "suspended" else "mailbox.resume"
            await self._audit(conn, actor, action, mailbox=address, detail=reason)
        return await self.get_mailbox(address)

    async def remove_mailbox(self, address: str, *, force: bool, actor: str) -> int:
        """Delete a mailbox; its keys go with it only when forced. Returns keys deleted."""
        address = normalize_address(address)
        async with self._transaction() as conn:
            mailbox_id = await self._mailbox_id(conn, address)
            (workspace,), = await conn.fetch(
                "SELECT w.name FROM mailbox m JOIN workspace w ON w.id = m.workspace_id "
                "WHERE m.id = ?", (mailbox_id,))
            key_ids = [r[0] for r in await conn.fetch(
                "SELECT id FROM auth_key WHERE mailbox_id = ?", (mailbox_id,))]
            if key_ids and not force:
                raise Conflict(
                    f"mailbox {address} has {len(key_ids)} key(s); "
                    "revoke or delete them, or pass --force to delete them with it"
                )
            for key_id in key_ids:
                await conn.execute("DELETE FROM auth_key WHERE id = ?", (key_id,))
                await self._audit(conn, actor, "key.delete", key_id=key_id, mailbox=address,
                                  detail="with its mailbox", workspace=workspace)
            await conn.execute("DELETE FROM mailbox WHERE id = ?", (mailbox_id,))
            await self._audit(conn, actor, "mailbox.remove", mailbox=address, workspace=workspace)
        return len(key_ids)

    # ------------------------------------------------------------------ keys

    async def create_key(
        self, *, name: str, actor: str, mailbox: str | None = None, workspace: str | None = None,
        owner: str | None = None, note: str | None = None,
        permissions: Iterable[str] = ("email.send",), expires: float | None = None,
        route: str | None = None, rate_limit: int | None = None, allow_from: Iterable[str] = (),
    ) -> tuple[AuthKey, str]:
        """Create a key; returns the record and the full key string, shown this once."""
        if (mailbox is None) == (workspace is None):
            raise StoreError("a key is scoped to exactly one mailbox or one workspace")
        if not isinstance(name, str) or not name.strip():
            raise StoreError("a key needs a descriptive name (e.g. 'CRM sync')")
        name = _check_setting("name", name)  # type: ignore[assignment]
        perms = _check_permissions(permissions)
        owner, note, route = (_check_setting(n, v) for n, v in  # type: ignore[assignment]
                              (("owner", owner), ("note", note), ("route", route)))
        rate_limit = _check_setting("rate_limit", rate_limit)  # type: ignore[assignment]
        expires = _check_setting("expires", expires)  # type: ignore[assignment]
        allowed = _check_setting("allow_from", allow_from)
        key_id = keys.generate_key_id()
        full, secret = keys.generate_key(key_id)
        async with self._transaction() as conn:
            mailbox_id = None
            if mailbox is not None:
                mailbox_id = await self._mailbox_id(conn, mailbox)
                ws_rows = await conn.fetch(
                    "SELECT workspace_id FROM mailbox WHERE id = ?", (mailbox_id,))
                ws_id = ws_rows[0][0]
            else:
                ws_id = await self._workspace_id(conn, workspace, create=False)
            record = await self._insert_key(
                conn, key_id=key_id, secret=secret, name=name, ws_id=ws_id, mailbox_id=mailbox_id,
                perms=perms, owner=owner, note=note, expires=expires, route=route,
                rate_limit=rate_limit, allowed=allowed, actor=actor)
        return record, full

    async def _insert_key(
        self, conn: Executor, *, key_id: str, secret: str, name: str, ws_id: int,
        mailbox_id: int | None, perms: tuple[str, ...], owner: object, note: object,
        expires: object, route: object, rate_limit: object, allowed: object, actor: str,
    ) -> AuthKey:
        """A new key, its settings already checked, in the caller's transaction."""
        await self._check_not_suspended(conn, ws_id, mailbox_id)
        await self._check_key_limit(conn, ws_id)
        await conn.execute(
            "INSERT INTO auth_key (id, name, owner, note, workspace_id, mailbox_id, "
            "permissions, status, created, expires, secret_hash, route, rate_limit, allow_from) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?)",
            (key_id, name.strip(), owner, note, ws_id, mailbox_id, " ".join(perms),
             time.time(), expires, keys.hash_secret(self._pepper, key_id, secret), route,
             rate_limit, allowed),
        )
        record = await self._key(conn, key_id)
        await self._audit(conn, actor, "key.create", key_id=key_id, mailbox=record.mailbox,
                          detail=f"name={record.name!r} scope={record.scope} "
                                 f"permissions={','.join(perms)}"
                                 + (f" allow_from={','.join(record.allow_from)}" if allowed else ""))
        return record

    @staticmethod
    async def _check_not_suspended(
        conn: Executor, ws_id: int, mailbox_id: int | None,
    ) -> None:
        """No new keys under a suspension: a key made there would look usable in every
        listing yet fail at its first login, and lifting the suspension is a decision of
        its own (resume first, then create)."""
        (ws_name, ws_status), = await conn.fetch(
            "SELECT name, status FROM workspace WHERE id = ?", (ws_id,))
        if ws_status == "suspended":
            raise Conflict(f"workspace {ws_name} is suspended; resume it before creating keys in it")
        if mailbox_id is not None:
            (address, status), = await conn.fetch(
                "SELECT address, status FROM mailbox WHERE id = ?", (mailbox_id,))
            if status == "suspended":
                raise Conflict(f"mailbox {address} is suspended; resume it before creating keys for it")

    async def _check_key_limit(self, conn: Executor, ws_id: int) -> None:
        rows = await conn.fetch(
            "SELECT w.name, w.key_limit, (SELECT count(*) FROM auth_key k WHERE k.workspace_id = w.id "
            "AND k.kind = 'key' AND k.status = 'active' AND (k.expires IS NULL OR k.expires > ?)) "
            "FROM workspace w WHERE w.id = ?",
            (time.time(), ws_id),
        )
        name, limit, active = rows[0]
        if active >= limit:
            raise Conflict(
                f"workspace {name} already has {active} active keys (limit {limit}); "
                "revoke unused keys or raise the limit"
            )

    async def _key(self, conn: Executor, key_id: str) -> AuthKey:
        rows = await conn.fetch(_KEY_SQL + " WHERE k.id = ?", (key_id,))
        if not rows:
            raise NotFound(f"unknown key: {key_id}")
        return _auth_key(rows[0])

    async def get_key(self, key_id: str) -> AuthKey:
        await self.flush_uses()
        rows = await self._rows(_KEY_SQL + " WHERE k.id = ?", (key_id,))
        if not rows:
            raise NotFound(f"unknown key: {key_id}")
        return _auth_key(rows[0])

    async def list_keys(
        self, *, mailbox: str | None = None, workspace: str | None = None,
        search: str | None = None, status: str | None = None, owner: str | None = None,
        unused_for: float | None = None, not_rotated_for: float | None = None,
        workspaces: Iterable[str] | None = None, kind: str | None = None,
    ) -> list[AuthKey]:
        """Keys and legacy passwords (`kind`: "key" or "legacy" for one of them) matching
        every filter given. `mailbox`: every key able to log in as it,
        its own and its workspace's (workspace keys have `mailbox` None, scope workspace:W).
        `unused_for` / `not_rotated_for` (seconds): active, unexpired keys not used (or not
        rotated) for that long, counting from their creation when never; `workspaces`: only keys
        of these (a limited token's view)."""
        clauses, params = [], []
        now = time.time()
        if workspaces is not None:
            _only_workspaces("w.name", workspaces, clauses, params)
        if owner is not None:
            clauses.append("k.owner IS NOT NULL")  # and _same_owner, below
        # the reports: keys that could log in (not disabled, revoked or expired) yet look idle
        if unused_for is not None:
            clauses.append("k.status = 'active' AND (k.expires IS NULL OR k.expires > ?) "
                           "AND coalesce(k.last_used, k.created) <= ?")
            params.extend([now, now - unused_for])
        if not_rotated_for is not None:
            clauses.append("k.status = 'active' AND (k.expires IS NULL OR k.expires > ?) "
                           "AND coalesce(k.rotated, k.created) <= ?")
            params.extend([now, now - not_rotated_for])
        if mailbox is not None:
            clauses.append(
                "(m.address = ? OR (k.mailbox_id IS NULL AND k.workspace_id = "
                "(SELECT workspace_id FROM mailbox WHERE address = ?)))"
            )
            params.extend([normalize_address(mailbox)] * 2)
        if workspace is not None:
            clauses.append("w.name = ?")
            params.append(workspace)
        if kind is not None:
            if kind not in ("key", "legacy"):
                raise StoreError(f"unknown kind {kind!r} (use key, legacy)")
            clauses.append("k.kind = ?")
            params.append(kind)
        if status is not None:
            if status not in _KEY_STATUSES:
                raise StoreError(f"unknown status {status!r} (use {', '.join(_KEY_STATUSES)})")
            clauses.append("k.status = ?")
            params.append(status)
        if search:
            # LIKE on lower() of both sides: case-blind on both engines (PostgreSQL's LIKE
            # minds case), the needle's own % _ and \ taken literally
            clauses.append("(" + " OR ".join(
                f"lower({column}) LIKE ? ESCAPE '\\'" for column in (
                    "k.name", "coalesce(k.owner, '')", "coalesce(k.note, '')",
                    "coalesce(m.address, '')", "w.name")) + " OR k.id = ?)")
            needle = "%" + _LIKE_SPECIAL.sub(r"\\\g<0>", search.lower()) + "%"
            params.extend([needle] * 5 + [search])
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        await self.flush_uses()
        rows = await self._rows(_KEY_SQL + where + " ORDER BY k.created, k.id", params)
        return [_auth_key(r) for r in rows if owner is None or _same_owner(r[2], owner)]

    async def update_key(self, key_id: str, changes: Mapping[str, object], *, actor: str) -> AuthKey:
        """Change a key's settings (KEY_SETTINGS; None clears one). Open sessions follow at
        their next MAIL FROM (a narrower allow-from ends those outside it). A revoked key
        cannot change: it will never log in again."""
        unknown = sorted(set(changes) - set(KEY_SETTINGS))
        if unknown:
            raise StoreError(f"a key's {unknown[0]} cannot be changed (can: {', '.join(KEY_SETTINGS)})")
        if not changes:
            raise StoreError("nothing to change (give at least one of: " + ", ".join(KEY_SETTINGS) + ")")
        values = {name: _check_setting(name, value) for name, value in changes.items()}
        async with self._transaction() as conn:
            record = await self._key(conn, key_id)
            if record.status == "revoked":
                raise Conflict(f"key {key_id} is revoked; a revoked key cannot be changed")
            now = time.time()
            if "expires" in values and record.status == "active" and record.expires is not None \
                    and record.expires <= now and not record.legacy:
                # an expired key does not count against the workspace's key limit: bringing
                # one back is a new active key, as `enable` is (else expired keys would let
                # an editor hold more active keys than the owner allowed); a legacy password
                # never counts (_check_key_limit), so bringing one back is never refused for it
                (ws_id,), = await conn.fetch(
                    "SELECT workspace_id FROM auth_key WHERE id = ?", (key_id,))
                await self._check_key_limit(conn, ws_id)
            await conn.execute(
                "UPDATE auth_key SET " + ", ".join(f"{name} = ?" for name in values) + " WHERE id = ?",
                (*values.values(), key_id),
            )
            updated = await self._key(conn, key_id)
            await self._audit(conn, actor, "key.update", key_id=key_id, mailbox=record.mailbox,
                              detail=" ".join(f"{name}={_audit_value(getattr(updated, name))}"
                                              for name in values))
            return updated

    async def revoke_keys(
        self, *, actor: str, owner: str | None = None, mailbox: str | None = None,
        workspaces: Iterable[str] | None = None,
    ) -> list[AuthKey]:
        """Revoke, in one transaction, every key not yet revoked of one owner (a contractor
        leaves) or scoped to one mailbox (its workspace's keys are left: they serve other
        mailboxes too), limited to `workspaces` when given. NotFound when there is none."""
        if (owner is None) == (mailbox is None):
            raise StoreError("revoke by exactly one of: owner, mailbox")
        if owner is not None and not owner.strip():
            raise StoreError("an owner to revoke the keys of must not be empty")
        clauses = ["k.status != 'revoked'"]
        params: list[object] = []
        if owner is not None:
            clauses.append("k.owner IS NOT NULL")  # and _same_owner, below
            what = f"owner {owner.strip()!r}"
        else:
            clauses.append("m.address = ?")
            params.append(normalize_address(mailbox))
            what = f"mailbox {normalize_address(mailbox)}"
        if workspaces is not None:
            _only_workspaces("w.name", workspaces, clauses, params)
        async with self._transaction() as conn:
            rows = [r for r in await conn.fetch(_KEY_SQL + " WHERE " + " AND ".join(clauses),
                                                           params)
                    if owner is None or _same_owner(r[2], owner)]
            if not rows:
                if mailbox is not None:
                    await self._mailbox_id(conn, mailbox)  # NotFound for an unknown mailbox
                raise NotFound(f"no keys to revoke for {what} (none, or all revoked already)")
            revoked = []
            for row in rows:
                key_id = row[0]
                await conn.execute(
                    "UPDATE auth_key SET status = 'revoked', prev_hash = NULL WHERE id = ?", (key_id,))
                await self._audit(conn, actor, "key.revoke", key_id=key_id, mailbox=row[5],
                                  detail=f"with every key of {what}")
                revoked.append(await self._key(conn, key_id))
            return revoked

    async def disable_key(self, key_id: str, *, actor: str) -> AuthKey:
        return await self._set_key_status(key_id, "disabled", actor)

    async def enable_key(self, key_id: str, *, actor: str) -> AuthKey:
        return await self._set_key_status(key_id, "active", actor)

    async def revoke_key(self, key_id: str, *, actor: str) -> AuthKey:
        return await self._set_key_status(key_id, "revoked", actor)

    async def _set_key_status(self, key_id: str, status: str, actor: str) -> AuthKey:
        async with self._transaction() as conn:
            record = await self._key(conn, key_id)
            if record.status == "revoked":
                raise Conflict(f"key {key_id} is revoked; revocation is permanent")
            if record.status == status:
                raise Conflict(f"key {key_id} is already {status}")
            if status == "active" and not record.legacy:  # a legacy password is no key to count
                ws = await conn.fetch(
                    "SELECT workspace_id FROM auth_key WHERE id = ?", (key_id,))
                await self._check_key_limit(conn, ws[0][0])
            # revocation also ends any rotation grace: the old secret must die with the key
            await conn.execute(
                "UPDATE auth_key SET status = ?, "
                "prev_hash = CASE WHEN ? = 'revoked' THEN NULL ELSE prev_hash END WHERE id = ?",
                (status, status, key_id),
            )
            action = {"active": "key.enable", "disabled": "key.disable", "revoked": "key.revoke"}
            await self._audit(conn, actor, action[status], key_id=key_id, mailbox=record.mailbox)
            return await self._key(conn, key_id)

    async def rotate_key(self, key_id: str, *, grace: float = 0, actor: str) -> tuple[AuthKey, str]:
        """Give the key a new secret; the old one stays valid for `grace` seconds. The grace
        is checked before anything is written: an infinite one kept the old secret forever,
        and one past what a date can hold made the caller fail after the commit, with the
        new secret never shown."""
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not math.isfinite(grace) \
                or grace < 0:
            raise StoreError("a grace period is a duration, 0 or more")
        if grace > MAX_GRACE:
            raise StoreError(f"a grace period is at most {MAX_GRACE / 86400:.0f} days")
        async with self._transaction() as conn:
            record = await self._key(conn, key_id)
            if record.legacy:
                raise Conflict(f"{key_id} is a legacy password: it is not rotated; give its mailbox "
                               f"a key instead (keystore legacy convert {record.mailbox})")
            if record.status == "revoked":
                raise Conflict(f"key {key_id} is revoked and cannot be rotated")
            full, secret = keys.generate_key(key_id)
            now = time.time()
            await conn.execute(
                "UPDATE auth_key SET prev_hash = CASE WHEN ? > 0 THEN secret_hash END, "
                "prev_valid_until = CASE WHEN ? > 0 THEN ? END, secret_hash = ?, rotated = ? "
                "WHERE id = ?",
                (grace, grace, now + grace, keys.hash_secret(self._pepper, key_id, secret), now,
                 key_id),
            )
            await self._audit(conn, actor, "key.rotate", key_id=key_id, mailbox=record.mailbox,
                              detail=f"grace={grace:g}s")
            return await self._key(conn, key_id), full

    async def end_rotation_grace(self, key_id: str, *, actor: str) -> AuthKey:
        """Retire the previous secret now (every caller has the new one): logins with it
        fail from now on, and sessions opened with it end at their next MAIL FROM."""
        async with self._transaction() as conn:
            record = await self._key(conn, key_id)
            now = time.time()
            if record.previous_valid_until is None or record.previous_valid_until <= now:
                raise Conflict(f"key {key_id} has no rotation grace running: its previous secret "
                                 "already does not work")
            await conn.execute("UPDATE auth_key SET prev_hash = NULL, prev_valid_until = NULL WHERE id = ?",
                               (key_id,))
            await self._audit(conn, actor, "key.end_grace", key_id=key_id, mailbox=record.mailbox,
                              detail=f"{record.previous_valid_until - now:.0f}s early")
            return await self._key(conn, key_id)

    async def delete_key(self, key_id: str, *, actor: str) -> AuthKey:
        async with self._transaction() as conn:
            record = await self._key(conn, key_id)
            if record.legacy and record.status == "revoked":
                # its record is what keeps a re-import of the same file from giving the
                # password back (_import_one): deleted, the old password logged in again
                raise Conflict(f"{key_id} is a retired legacy password: it is kept so that importing "
                               "the password file again does not give it back; it can never log in")
            await conn.execute("DELETE FROM auth_key WHERE id = ?", (key_id,))
            await self._audit(conn, actor, "key.delete", key_id=key_id, mailbox=record.mailbox,
                              detail=f"name={record.name!r}", workspace=record.workspace)
        return record

    async def routes_in_use(self) -> dict[str, list[str]]:
        """Route names set on keys or mailboxes → where (so the relay can refuse to start
        with a route its config does not define)."""
        rows = await self._rows(
            "SELECT route, 'key ' || id FROM auth_key WHERE route IS NOT NULL "
            "UNION ALL SELECT route, 'mailbox ' || address FROM mailbox WHERE route IS NOT NULL"
        )
        used: dict[str, list[str]] = {}
        for route, where in rows:
            used.setdefault(route, []).append(where)
        return used

    # ------------------------------------------------------- legacy passwords

    async def import_legacy(
        self, entries: Sequence[LegacyEntry], *, source: str, actor: str,
        workspace: str | None = None, problems: Sequence[BadLine] = (), skip_bad: bool = False,
        dry_run: bool = False,
    ) -> LegacyImport:
        """Import legacy passwords (keystore/passwdfile.py read them), in one transaction:
        the missing mailboxes are created (in `workspace`, else a workspace named after
        the address's domain), each gets one legacy credential holding its hash as it is.
        A mailbox whose password is already here is updated when the hash differs (its
        open sessions end at their next command) and left alone when it does not; one whose
        password was retired (revoked, or converted) is not given it back. `problems`: the
        file's bad lines; with any (or a line this keystore refuses: an alias's address),
        nothing is imported unless `skip_bad`. `dry_run`: the same report, nothing kept."""
        report = LegacyImport(problems=list(problems))
        try:
            async with self._transaction() as conn:
                for entry in entries:
                    await self._import_one(conn, entry, report, source=source, actor=actor,
                                           workspace=workspace)
                report.problems.sort(key=lambda problem: problem.line)  # the store's, in file order
                if report.problems and not skip_bad:
                    raise Conflict(f"{len(report.problems)} bad line(s) in {source}; nothing imported "
                                   "(fix them, or pass --skip-bad to import the others):\n"
                                   + "\n".join(f"  {p}" for p in report.problems))
                await self._audit(conn, actor, "legacy.import",
                                  detail=f"source={source!r} {report.summary()}")
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
        return report

    async def _import_one(self, conn: Executor, entry: LegacyEntry, report: LegacyImport, *,
                          source: str, actor: str, workspace: str | None) -> None:
        # in the form every other address is stored and looked up in: an entry not made by
        # passwdfile.py ("Alice@Example.COM") made a second mailbox nobody could log in as
        try:
            address = normalize_address(entry.address)
        except StoreError:
            report.problems.append(BadLine(entry.line, None, "not a valid mailbox address"))
            return
        if await conn.fetch("SELECT 1 FROM alias WHERE address = ?", (address,)):
            report.problems.append(BadLine(entry.line, address, "an alias of another mailbox here: "
                                                                "import the mailbox's own address"))
            return
        rows = await conn.fetch("SELECT id, workspace_id FROM mailbox WHERE address = ?", (address,))
        if rows:
            mailbox_id, ws_id = rows[0]
        else:
            ws_name = workspace or address.rpartition("@")[2]
            if workspace is None and not _WORKSPACE_RE.match(ws_name):  # e.g. longer than 64
                report.problems.append(BadLine(
                    entry.line, address, "its domain cannot name a workspace (at most 64 letters, "
                    "digits, '.', '_' and '-'); give --workspace"))
                return
            ws_id = await self._workspace_id(conn, ws_name, create=True)
            mailbox_id = await conn.insert_returning_id(
                "INSERT INTO mailbox (address, workspace_id, created) VALUES (?, ?, ?)",
                (address, ws_id, time.time()))
            await self._audit(conn, actor, "mailbox.add", mailbox=address,
                              detail=f"workspace={ws_name} with a legacy password from {source}")
            report.mailboxes_created.append(address)
        existing = await conn.fetch(
            "SELECT id, status, password_hash, allow_from FROM auth_key WHERE mailbox_id = ? "
            "AND kind = 'legacy' ORDER BY status = 'revoked', created DESC", (mailbox_id,))
        allowed = " ".join(entry.allow_from) or None
        if existing and existing[0][1] == "revoked":
            report.retired.append(address)
            return
        if existing:
            cred_id, _, old_hash, old_allowed = existing[0]
            if old_hash == entry.password_hash and old_allowed == allowed:
                report.unchanged.append(address)
                return
            await conn.execute(
                "UPDATE auth_key SET password_hash = ?, scheme = ?, secret_hash = ?, allow_from = ? "
                "WHERE id = ?",
                (entry.password_hash, entry.scheme,
                 legacy_fingerprint(self._pepper, cred_id, entry.password_hash), allowed, cred_id))
            changed = "password" if old_hash != entry.password_hash else "allow_from"
            await self._audit(conn, actor, "legacy.update", key_id=cred_id, mailbox=address,
                              detail=f"{changed} from {source} line {entry.line}")
            report.updated.append(address)
            return
        cred_id = keys.generate_key_id()
        await conn.execute(
            "INSERT INTO auth_key (id, name, note, workspace_id, mailbox_id, permissions, status, "
            "created, secret_hash, allow_from, kind, scheme, password_hash) "
            "VALUES (?, 'legacy password', ?, ?, ?, 'email.send', 'active', ?, ?, ?, 'legacy', ?, ?)",
            (cred_id, f"imported from {source} line {entry.line}", ws_id, mailbox_id, time.time(),
             legacy_fingerprint(self._pepper, cred_id, entry.password_hash), allowed, entry.scheme,
             entry.password_hash))
        await self._audit(conn, actor, "legacy.import", key_id=cred_id, mailbox=address,
                          detail=f"scheme={ACCEPTED[entry.scheme]} from {source} line {entry.line}"
                                 + (f" allow_from={','.join(entry.allow_from)}" if allowed else ""))
        report.created.append(address)

    async def expire_legacy(
        self, deadline: float, *, actor: str, workspace: str | None = None,
        mailbox: str | None = None, workspaces: Iterable[str] | None = None,
    ) -> list[AuthKey]:
        """Set the deadline after which the live legacy passwords in scope stop working (the
        535 then tells the client to use an auth key). One already past its deadline stays
        ended (`key update ID --expires` brings a single one back). Returns those set."""
        deadline = _check_setting("expires", deadline)  # type: ignore[assignment]
        clauses = ["k.kind = 'legacy'", "k.status != 'revoked'", "(k.expires IS NULL OR k.expires > ?)"]
        params: list[object] = [time.time()]
        if workspace is not None:
            clauses.append("w.name = ?")
            params.append(workspace)
        if mailbox is not None:
            clauses.append("m.address = ?")
            params.append(normalize_address(mailbox))
        if workspaces is not None:
            _only_workspaces("w.name", workspaces, clauses, params)
        async with self._transaction() as conn:
            rows = await conn.fetch(_KEY_SQL + " WHERE " + " AND ".join(clauses) + " ORDER BY m.address",
                                    params)
            changed = []
            for row in rows:
                await conn.execute("UPDATE auth_key SET expires = ? WHERE id = ?", (deadline, row[0]))
                await self._audit(conn, actor, "legacy.expire", key_id=row[0], mailbox=row[5],
                                  detail=f"deadline={_audit_value(deadline)}")
                changed.append(await self._key(conn, row[0]))
            return changed

    async def convert_legacy(
        self, mailbox: str, *, actor: str, name: str = "converted from legacy password",
    ) -> tuple[AuthKey, AuthKey, str]:
        """Give a mailbox with a legacy password a key (same route, rate limit and allow-from),
        and mark the password to be retired once the key has been used (`_retire_converted`,
        at the relay's next bookkeeping after the key's first login). Returns (the legacy
        credential, the new key, its secret shown this once)."""
        if not isinstance(name, str) or not name.strip():
            raise StoreError("a key needs a descriptive name (e.g. 'Thunderbird')")
        name = _check_setting("name", name)  # type: ignore[assignment]
        address = normalize_address(mailbox)
        key_id = keys.generate_key_id()
        full, secret = keys.generate_key(key_id)
        async with self._transaction() as conn:
            mailbox_id = await self._mailbox_id(conn, address)
            rows = await conn.fetch(_KEY_SQL + " WHERE k.mailbox_id = ? AND k.kind = 'legacy' "
                                    "AND k.status != 'revoked'", (mailbox_id,))
            if not rows:
                raise NotFound(f"mailbox {address} has no legacy password to convert")
            legacy = _auth_key(rows[0])
            if legacy.replaced_by is not None:
                waiting = await conn.fetch("SELECT status FROM auth_key WHERE id = ?", (legacy.replaced_by,))
                if waiting and waiting[0][0] != "revoked":
                    raise Conflict(f"mailbox {address} already has key {legacy.replaced_by} to replace "
                                   "its password (retired at that key's first use); revoke that key "
                                   "to convert again")
            (ws_id,), = await conn.fetch("SELECT workspace_id FROM mailbox WHERE id = ?", (mailbox_id,))
            record = await self._insert_key(
                conn, key_id=key_id, secret=secret, name=name, ws_id=ws_id, mailbox_id=mailbox_id,
                perms=("email.send",), owner=legacy.owner, note=f"replaces legacy password {legacy.id}",
                expires=None, route=legacy.route, rate_limit=legacy.rate_limit,
                allowed=" ".join(legacy.allow_from) or None, actor=actor)
            await conn.execute("UPDATE auth_key SET replaced_by = ? WHERE id = ?", (key_id, legacy.id))
            await self._audit(conn, actor, "legacy.convert", key_id=legacy.id, mailbox=address,
                              detail=f"replaced by key {key_id}; retired at that key's first use")
            return await self._key(conn, legacy.id), record, full

    async def _retire_converted(self) -> None:
        """Revoke the legacy passwords whose replacement key (`convert_legacy`) has been used.
        Read from what is stored, not from this process's logins: a retirement missed (the
        database did not answer) happens at the next flush of any node."""
        rows = await self._db.fetch(
            "SELECT l.id, m.address, k.id, k.last_used, k.last_ip FROM auth_key l "
            "JOIN auth_key k ON k.id = l.replaced_by LEFT JOIN mailbox m ON m.id = l.mailbox_id "
            "WHERE l.kind = 'legacy' AND l.status != 'revoked' AND k.last_used IS NOT NULL "
            "AND k.status = 'active'", ())
        if not rows:
            return
        async with self._transaction() as conn:
            for legacy_id, address, key_id, used, ip in rows:
                current = await conn.fetch("SELECT status FROM auth_key WHERE id = ?", (legacy_id,))
                if not current or current[0][0] == "revoked":
                    continue  # another node retired it first
                await conn.execute("UPDATE auth_key SET status = 'revoked', prev_hash = NULL WHERE id = ?",
                                   (legacy_id,))
                await self._audit(conn, "relay", "legacy.retire", key_id=legacy_id, mailbox=address,
                                  detail=f"its replacement key {key_id} was first used "
                                         f"{_audit_value(used)} from {ip}")

    # ------------------------------------------------------------ workspaces

    async def list_workspaces(self) -> list[Workspace]:
        rows = await self._rows(
            "SELECT w.name, w.key_limit, "
            "(SELECT count(*) FROM auth_key k WHERE k.workspace_id = w.id AND k.status = 'active' "
            "AND k.kind = 'key'),"
            " (SELECT count(*) FROM mailbox m WHERE m.workspace_id = w.id), "
            "w.status, w.suspended_reason, w.suspended_at "
            "FROM workspace w ORDER BY w.name"
        )
        return [Workspace(name=r[0], key_limit=r[1], active_keys=r[2], mailboxes=r[3], status=r[4],
                          suspended_reason=r[5], suspended_at=r[6]) for r in rows]

    async def suspend_workspace(self, name: str, *, reason: str | None, actor: str) -> tuple[int, int]:
        """Every key of the workspace, mailbox keys and workspace keys, fails at AUTH with
        `suspended` (and open sessions at their next MAIL FROM) until `resume_workspace`;
        the keys and each mailbox's own status are untouched. Returns (mailbox keys,
        workspace keys) of the workspace."""
        return await self._set_workspace_status(name, "suspended", reason, actor)

    async def resume_workspace(self, name: str, *, actor: str) -> tuple[int, int]:
        return await self._set_workspace_status(name, "active", None, actor)

    async def _set_workspace_status(
        self, name: str, status: str, reason: str | None, actor: str
    ) -> tuple[int, int]:
        async with self._transaction() as conn:
            ws_id = await self._workspace_id(conn, name, create=False)
            (current, mailbox_keys, workspace_keys), = await conn.fetch(
                "SELECT status, (SELECT count(*) FROM auth_key WHERE workspace_id = ? AND "
                "mailbox_id IS NOT NULL), (SELECT count(*) FROM auth_key WHERE workspace_id = ? "
                "AND mailbox_id IS NULL) FROM workspace WHERE id = ?", (ws_id, ws_id, ws_id))
            if current == status:
                raise Conflict(f"workspace {name} is already {status}")
            await conn.execute(
                "UPDATE workspace SET status = ?, suspended_reason = ?, suspended_at = ? WHERE id = ?",
                (status, reason, time.time() if status == "suspended" else None, ws_id),
            )
            action = "workspace.suspend" if status == "suspended" else "workspace.resume"
            await self._audit(conn, actor, action, workspace=name,
                              detail=name + (f" reason={reason}" if reason else ""))
        return mailbox_keys, workspace_keys

    async def set_key_limit(self, workspace: str, limit: int, *, actor: str) -> None:
        if limit < 0:
            raise StoreError("a key limit is a number of active keys, 0 or more")
        if limit > MAX_KEY_LIMIT:  # PostgreSQL's integer column: past it, no limit to store
            raise StoreError(f"a key limit is at most {MAX_KEY_LIMIT}")
        async with self._transaction() as conn:
            ws_id = await self._workspace_id(conn, workspace, create=False)
            await conn.execute("UPDATE workspace SET key_limit = ? WHERE id = ?", (limit, ws_id))
            await self._audit(conn, actor, "workspace.limit", workspace=workspace,
                              detail=f"{workspace} key_limit={limit}")

    # ---------------------------------------------------------- admin tokens

    async def create_token(
        self, *, name: str, role: str, workspaces: Iterable[str] = (), actor: str,
        replace: bool = False,
    ) -> tuple[AdminToken, str]:
        """A new admin token; returns the record and the full token, shown this once.
        `replace`: revoke the active tokens of the same name in the same transaction (two
        at once, such as two `make run` starting, leave one active token and both succeed)."""
        if not name.strip():
            raise StoreError("an admin token needs a name saying who or what uses it")
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r} (use {', '.join(ROLES)})")
        names = sorted({w.strip() for w in workspaces})
        if role == "owner" and names:
            raise StoreError("an owner token covers every workspace; give --workspace to viewers "
                             "and editors only")
        token_id = keys.generate_key_id()
        full, secret = keys.generate_key(token_id, keys.TOKEN_PREFIX)
        async with self._transaction() as conn:
            for workspace in names:
                await self._workspace_id(conn, workspace, create=False)
            if replace:
                for (old_id,) in await conn.fetch(
                        "SELECT id FROM admin_token WHERE name = ? AND status = 'active' "
                        "ORDER BY created, id", (name.strip(),)):
                    await conn.execute("UPDATE admin_token SET status = 'revoked', revoked_at = ? "
                                       "WHERE id = ?", (time.time(), old_id))
                    await self._audit(conn, actor, "token.revoke",
                                      detail=f"{old_id} name={name.strip()!r}")
            await conn.execute(
                "INSERT INTO admin_token (id, name, role, workspaces, secret_hash, created, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, name.strip(), role, " ".join(names) or None,
                 _token_hash(self._pepper, token_id, secret), time.time(), actor),
            )
            await self._audit(conn, actor, "token.create",
                              detail=f"{token_id} name={name.strip()!r} role={role}"
                                     + (f" workspaces={','.join(names)}" if names else ""))
            return await self._token(conn, token_id), full

    async def _token(self, conn: Executor, token_id: str) -> AdminToken:
        rows = await conn.fetch(_ADMIN_ROW_SQL + " WHERE id = ?", (token_id,))
        if not rows:
            raise NotFound(f"unknown admin token: {token_id}")
        return _admin_token(rows[0])

    async def get_token(self, token_id: str) -> AdminToken:
        rows = await self._rows(_ADMIN_ROW_SQL + " WHERE id = ?", (token_id,))
        if not rows:
            raise NotFound(f"unknown admin token: {token_id}")
        return _admin_token(rows[0])

    async def list_tokens(self) -> list[AdminToken]:
        return [_admin_token(r) for r in await self._rows(_ADMIN_ROW_SQL + " ORDER BY created, id")]

    async def revoke_token(self, token_id: str, *, actor: str) -> AdminToken:
        async with self._transaction() as conn:
            record = await self._token(conn, token_id)
            if record.status == "revoked":
                raise Conflict(f"admin token {token_id} is already revoked")
            await conn.execute("UPDATE admin_token SET status = 'revoked', revoked_at = ? WHERE id = ?",
                               (time.time(), token_id))
            await self._audit(conn, actor, "token.revoke", detail=f"{token_id} name={record.name!r}")
            return await self._token(conn, token_id)

    async def verify_token(self, presented: str, client_ip: str) -> AdminToken | None:
        """The active token `presented` is, or None. As `authenticate`: one read that
        always returns a row and a constant-time comparison, so an unknown id and a wrong
        secret cost the same."""
        parsed = keys.parse_key(presented, keys.TOKEN_PREFIX)
        if parsed is None:
            return None
        (row,) = await self._rows(
            "SELECT t.id, t.secret_hash, t.status, t.last_used FROM (SELECT ? AS tid) q "
            "LEFT JOIN admin_token t ON t.id = q.tid", (parsed.key_id,), login=True)
        matches = hmac.compare_digest(_token_hash(self._pepper, parsed.key_id, parsed.secret),
                                      row[1] or _DUMMY_HASH)
        if not matches or row[0] is None or row[2] != "active":
            return None
        now = time.time()
        if row[3] is None or now - row[3] >= TOKEN_USE_WRITE_INTERVAL:
            try:
                async with self._transaction() as conn:
                    await conn.execute("UPDATE admin_token SET last_used = ?, last_ip = ? WHERE id = ?",
                                       (now, client_ip, row[0]))
            except KeystoreUnavailable:
                pass  # bookkeeping must not refuse a valid token
        return await self.get_token(row[0])

    # ----------------------------------------------------------------- audit

    async def _audit(
        self, conn: Executor, actor: str, action: str, *,
        key_id: str | None = None, mailbox: str | None = None, detail: str | None = None,
        workspace: str | None = None,
    ) -> None:
        """One audit entry, in the caller's transaction. Its workspace (what a token limited
        to some workspaces may read) is the one given, else the key's, else the mailbox's."""
        await conn.execute(
            "INSERT INTO audit (at, actor, action, key_id, mailbox, detail, workspace) "
            "VALUES (?, ?, ?, ?, ?, ?, coalesce(?, "
            "(SELECT w.name FROM auth_key k JOIN workspace w ON w.id = k.workspace_id WHERE k.id = ?), "
            "(SELECT w.name FROM mailbox m JOIN workspace w ON w.id = m.workspace_id "
            "WHERE m.address = ?)))",
            (time.time(), actor, action, key_id, mailbox, detail, workspace, key_id, mailbox),
        )

    async def audit_events(
        self, *, key_id: str | None = None, mailbox: str | None = None, since: float | None = None,
        workspaces: Iterable[str] | None = None, limit: int | None = None,
    ) -> list[AuditEvent]:
        """Entries matching every filter, oldest first; `workspaces`: only entries of
        these (a limited token's view); `limit`: the newest `limit` of them."""
        clauses, params = [], []
        if workspaces is not None:
            _only_workspaces("workspace", workspaces, clauses, params)
        if key_id is not None:
            clauses.append("key_id = ?")
            params.append(key_id)
        if mailbox is not None:
            clauses.append("mailbox = ?")
            params.append(normalize_address(mailbox))
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = "SELECT id, at, actor, action, key_id, mailbox, detail, workspace FROM audit" + where
        if limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT {int(limit)}) AS newest"
        rows = await self._rows(sql + " ORDER BY id", params)
        return [AuditEvent(id=r[0], at=r[1], actor=r[2], action=r[3], key_id=r[4], mailbox=r[5],
                           detail=r[6], workspace=r[7]) for r in rows]

    async def backup(self, target: Path) -> None:
        """Online, consistent copy, created 0600 (sqlite); a PostgreSQL keystore is backed
        up with pg_dump: StoreError saying so."""
        await self._db.backup(target)


_ADMIN_ROW_SQL = """
SELECT id, name, role, workspaces, status, created, created_by, last_used, last_ip, revoked_at
FROM admin_token
"""


class _DryRun(Exception):
    """Rolls back a dry-run import's transaction after its report is made."""


@dataclass(slots=True)
class LegacyImport:
    """What an import did (or, dry run, would do), by mailbox address."""

    mailboxes_created: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # new legacy passwords
    updated: list[str] = field(default_factory=list)  # a new hash (or allow_nets) for one here
    unchanged: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)  # retired here: not given back
    problems: list[BadLine] = field(default_factory=list)

    def summary(self) -> str:
        return (f"created={len(self.created)} updated={len(self.updated)} "
                f"unchanged={len(self.unchanged)} retired_not_reimported={len(self.retired)} "
                f"new_mailboxes={len(self.mailboxes_created)} bad_lines={len(self.problems)}")


def _only_workspaces(column: str, workspaces: Iterable[str], clauses: list[str], params: list) -> None:
    """A clause limiting a query to some workspaces (a limited token's view): `column` IN
    them, or nothing at all for none."""
    names = list(workspaces)
    clauses.append(f"{column} IN ({','.join('?' * len(names))})" if names else "1 = 0")
    params.extend(names)


def _token_hash(pepper: bytes, token_id: str, secret: str) -> bytes:
    """Keyed like a key's, in a namespace of its own: a token's hash never equals a key's."""
    return keys.hash_secret(pepper, f"token:{token_id}", secret)


def _admin_token(row: tuple) -> AdminToken:
    return AdminToken(
        id=row[0], name=row[1], role=row[2], workspaces=tuple(row[3].split()) if row[3] else (),
        status=row[4], created=row[5], created_by=row[6], last_used=row[7], last_ip=row[8],
        revoked_at=row[9],
    )


def _audit_value(value: object) -> str:
    if value is None or value == ():
        return "-"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return repr(value) if isinstance(value, str) else str(value)


def _secret_valid(row: tuple, presented: bytes, now: float) -> bool:
    """Whether a keyed hash is the key's current secret, or its previous one within the
    rotation grace. Both comparisons always run, in constant time."""
    current_ok = hmac.compare_digest(presented, row[3] or _DUMMY_HASH)
    previous_ok = hmac.compare_digest(presented, row[4] or _DUMMY_HASH)
    in_grace = row[5] is not None and now < row[5]
    return current_ok or (previous_ok and in_grace)


def _same_owner(stored: str, wanted: str) -> bool:
    """Owners are names people type: " Dana ", "dana" and "DANA" are one owner, and so are
    "Åsa" and "åsa" (sqlite's lower() folds ASCII only, so this is done here). Stripped
    for keys of older releases, which stored the owner as typed."""
    return stored.strip().casefold() == wanted.strip().casefold()


def control_character(char: str) -> bool:
    """Whether a terminal or a page would obey `char` rather than show it: C0/C1 controls
    (escape sequences start with one) and the bidirectional overrides."""
    return unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS


def _check_setting(name: str, value: object) -> object:
    """A key setting (KEY_SETTINGS, or the name at creation) as stored, or StoreError.

    The HTTP API, the console and the CLI all hand their values here, so the type is
    checked too: True is an int to Python, a text is an iterable of one-letter "networks",
    and float('inf') or a year past 9999 would make every later listing fail. Text
    typed about a key is stripped (an owner " dana " is the owner dana, found by
    `key revoke --owner dana`) and may not carry control characters (a limited admin token
    writes what an owner reads in a root shell); a note may have lines and tabs."""
    if value is None:
        return None
    if name == "rate_limit":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise StoreError("a rate limit is a number of messages per minute, at least 1")
        if value > MAX_RATE_LIMIT:
            raise StoreError(f"a rate limit is at most {MAX_RATE_LIMIT} messages per minute")
        return value
    if name == "expires":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise StoreError("expiry is not a time")
        if value <= time.time():
            raise StoreError("expiry is in the past")
        if value > LATEST_EXPIRY:
            raise StoreError("expiry is after 9999-12-31")
        return float(value)
    if name == "allow_from":
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise StoreError("allow-from is a list of networks (CIDR), not one text")
        values = list(value)
        if not all(isinstance(v, str) for v in values):
            raise StoreError("allow-from is a list of networks (CIDR), not one text")
        try:
            return networks.canonical_networks(values)
        except ValueError as exc:
            raise StoreError(str(exc)) from None
    if not isinstance(value, str):
        raise StoreError(f"{name} must be text")
    text = value.replace("\r\n", "\n").strip()
    allowed = "\n\t" if name == "note" else ""
    if any(control_character(c) and c not in allowed for c in text):
        raise StoreError(f"{name} must not contain control characters")
    if len(text) > _TEXT_LIMITS[name]:
        raise StoreError(f"{name} is at most {_TEXT_LIMITS[name]} characters")
    return text or None


def _check_permissions(permissions: Iterable[str]) -> tuple[str, ...]:
    perms = tuple(dict.fromkeys(permissions))
    unknown = [p for p in perms if p not in PERMISSIONS]
    if unknown:
        raise StoreError(f"unknown permission {unknown[0]!r} (use {', '.join(PERMISSIONS)})")
    if not perms:
        raise StoreError("a key needs at least one permission")
    return perms


def _mailbox(row: tuple) -> Mailbox:
    return Mailbox(
        address=row[0], workspace=row[1], aliases=tuple(row[2].split()) if row[2] else (),
        status=row[3], suspended_reason=row[4], suspended_at=row[5], route=row[6],
        created=row[7], keys=row[8], workspace_keys=row[9], legacy_password=bool(row[10]),
    )


def _auth_key(row: tuple) -> AuthKey:
    return AuthKey(
        id=row[0], name=row[1], owner=row[2], note=row[3], workspace=row[4], mailbox=row[5],
        permissions=tuple(row[6].split()), status=row[7], created=row[8], expires=row[9],
        rotated=row[10], previous_valid_until=row[11], last_used=row[12], last_ip=row[13],
        route=row[14], rate_limit=row[15], allow_from=tuple(row[16].split()) if row[16] else (),
        last_failed=row[17], last_failed_ip=row[18], last_failed_reason=row[19],
        kind=row[20], scheme=row[21], replaced_by=row[22],
    )
