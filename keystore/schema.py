"""The keystore's tables, versioned with PRAGMA user_version.

Each entry of MIGRATIONS moves the schema one version up and runs in one transaction, so a
database is always at a known version. Never edit a released migration: append one.
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["MIGRATIONS", "enable_wal", "migrate", "run_migrations"]

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE workspace (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        key_limit INTEGER NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE mailbox (
        id INTEGER PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        workspace_id INTEGER NOT NULL REFERENCES workspace(id),
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
        suspended_reason TEXT,
        suspended_at REAL,
        route TEXT,
        created REAL NOT NULL
    );
    CREATE TABLE alias (
        address TEXT PRIMARY KEY,
        mailbox_id INTEGER NOT NULL REFERENCES mailbox(id) ON DELETE CASCADE
    );
    CREATE INDEX alias_mailbox ON alias(mailbox_id);
    CREATE TABLE auth_key (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        owner TEXT,
        note TEXT,
        workspace_id INTEGER NOT NULL REFERENCES workspace(id),
        mailbox_id INTEGER REFERENCES mailbox(id),
        permissions TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
        created REAL NOT NULL,
        expires REAL,
        secret_hash BLOB NOT NULL,
        prev_hash BLOB,
        prev_valid_until REAL,
        rotated REAL,
        last_used REAL,
        last_ip TEXT,
        route TEXT,
        rate_limit INTEGER
    );
    CREATE INDEX auth_key_mailbox ON auth_key(mailbox_id);
    CREATE INDEX auth_key_workspace ON auth_key(workspace_id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        key_id TEXT,
        mailbox TEXT,
        detail TEXT
    );
    CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
    # 2: per-key client networks (`key create --allow-from`): canonical CIDRs separated by
    # spaces; NULL: the key works from anywhere, as every key did before
    """
    ALTER TABLE auth_key ADD COLUMN allow_from TEXT;
    """,
    # 3: `keystore workspace suspend / resume`: a suspended workspace's keys all fail at AUTH
    # as a suspended mailbox's do; the mailboxes' own status is left as it is
    """
    ALTER TABLE workspace ADD COLUMN status TEXT NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'suspended'));
    ALTER TABLE workspace ADD COLUMN suspended_reason TEXT;
    ALTER TABLE workspace ADD COLUMN suspended_at REAL;
    """,
    # 4: the admin console (issue 11): a key's last failed use (the right secret refused,
    # e.g. from outside its allow-from); the workspace of each audit entry, so a token
    # limited to some workspaces sees their trail only; admin tokens with roles, hashed
    # like keys. Older entries get the workspace only where it is certain (NULL: owners
    # only): their key's (a key never changes workspace, and its id is never reused), else
    # their mailbox's when that address was never removed (a removed address may have been
    # added again elsewhere). The append-only trigger steps aside for this one UPDATE.
    """
    ALTER TABLE auth_key ADD COLUMN last_failed REAL;
    ALTER TABLE auth_key ADD COLUMN last_failed_ip TEXT;
    ALTER TABLE auth_key ADD COLUMN last_failed_reason TEXT;
    ALTER TABLE audit ADD COLUMN workspace TEXT;
    DROP TRIGGER audit_append_only_update;
    UPDATE audit SET workspace = coalesce(
        (SELECT w.name FROM auth_key k JOIN workspace w ON w.id = k.workspace_id
         WHERE k.id = audit.key_id),
        (SELECT w.name FROM mailbox m JOIN workspace w ON w.id = m.workspace_id
         WHERE m.address = audit.mailbox AND audit.mailbox NOT IN
             (SELECT mailbox FROM audit WHERE action = 'mailbox.remove' AND mailbox IS NOT NULL)));
    CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE INDEX audit_workspace ON audit(workspace, id);
    CREATE INDEX audit_key ON audit(key_id);
    CREATE TABLE admin_token (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'editor', 'owner')),
        workspaces TEXT,
        secret_hash BLOB NOT NULL,
        status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
        created REAL NOT NULL,
        created_by TEXT NOT NULL,
        last_used REAL,
        last_ip TEXT,
        revoked_at REAL
    );
    """,
    # 5: legacy passwords (issue 13): hashes imported from a Dovecot passwd-file or an
    # htpasswd file (keystore/legacy.py), kept as they are. They live beside the keys, as
    # credentials of kind 'legacy', so every rule of a key holds for them (status, expiry:
    # the deadline of `keystore legacy expire`, suspension, allow-from, rate limit, the
    # re-check) and every listing shows them. secret_hash holds a keyed fingerprint of the
    # stored hash (legacy.fingerprint); replaced_by names the key of `keystore legacy
    # convert`, whose first use retires the password. One live password per mailbox.
    """
    ALTER TABLE auth_key ADD COLUMN kind TEXT NOT NULL DEFAULT 'key' CHECK (kind IN ('key', 'legacy'));
    ALTER TABLE auth_key ADD COLUMN scheme TEXT;
    ALTER TABLE auth_key ADD COLUMN password_hash TEXT;
    ALTER TABLE auth_key ADD COLUMN replaced_by TEXT;
    CREATE UNIQUE INDEX auth_key_one_legacy ON auth_key(mailbox_id)
        WHERE kind = 'legacy' AND status != 'revoked';
    CREATE INDEX auth_key_legacy ON auth_key(kind) WHERE kind = 'legacy';
    CREATE INDEX auth_key_replaced_by ON auth_key(replaced_by) WHERE replaced_by IS NOT NULL;
    """,
]


def enable_wal(conn: sqlite3.Connection, timeout: float = 5.0) -> None:
    """Put the file in WAL mode. Switching a new file's journal mode takes an exclusive lock
    for which sqlite does not wait (busy_timeout does not apply), so several processes
    creating the same file at once (`keystore init` twice, the relay and `relay queue`)
    would see "database is locked": wait here instead."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a keystore database up to the newest version; returns that version."""
    return run_migrations(conn, MIGRATIONS, what="keystore")


def run_migrations(conn: sqlite3.Connection, migrations: list[str], *, what: str) -> int:
    """Apply `migrations` past the file's PRAGMA user_version, each in one transaction.

    Shared with the relay's spool (relay/queue/schema.py): the same rules for both files."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise sqlite3.DatabaseError(
            f"{what} schema version {version} is newer than this program ({len(migrations)})"
        )
    for number in range(version + 1, len(migrations) + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] >= number:
                conn.execute("COMMIT")  # another process migrated while we waited for the lock
                continue
            for statement in _statements(migrations[number - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return len(migrations)


def _statements(script: str) -> list[str]:
    """Split a script on complete statements (triggers contain inner semicolons)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out
