"""The spool's tables, versioned with PRAGMA user_version (the keystore's migration rules:
one transaction per version, never edit a released migration, append one).

Version 1 is the schema spools had before versioning (created with IF NOT EXISTS, so an
old spool at user_version 0 passes through it unchanged). Version 2 adds what the queue
needs to never repeat or lose anything: the claim of the relay delivering a message, an
admin's delete or hold requested while it is in flight, the count of unexpected errors
(poison messages), and per-recipient `notified` (the bounce naming a failure is stored).
It also moves bodies to a table of their own: columns stored after a large blob can only
be read by walking the blob's overflow pages, so the schedule and `relay queue list`
would read every body of a long queue.

Migrations run with foreign keys off (sqlite's recipe for rebuilding a table: dropping the
old `message` must not cascade to its recipients).
"""

from __future__ import annotations

import functools
import sqlite3

from keystore.schema import run_migrations

__all__ = ["MIGRATIONS", "SchemaDamaged", "check_tables", "migrate"]


class SchemaDamaged(sqlite3.DatabaseError):
    """The file says it is at a version whose tables it does not have."""

MIGRATIONS: list[str] = [
    # 1: the schema before versioning
    """
    CREATE TABLE IF NOT EXISTS message (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        mail_from TEXT NOT NULL,
        key_id TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        route TEXT,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT,
        held INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE IF NOT EXISTS recipient (
        message_id TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
        reply TEXT,
        PRIMARY KEY (message_id, address)
    );
    """,
    # 2: claims, deferred admin changes, poison count, per-recipient bounce state; bodies apart
    """
    CREATE TABLE message_v2 (
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        mail_from TEXT NOT NULL,
        key_id TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        route TEXT,
        size INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT,
        held INTEGER NOT NULL DEFAULT 0,
        claimed TEXT,
        delete_requested INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO message_v2 (id, created, mail_from, key_id, mailbox, route, size, attempts,
                            next_attempt, last_error, held)
        SELECT id, created, mail_from, key_id, mailbox, route, length(body), attempts, next_attempt,
               last_error, held FROM message;
    CREATE TABLE body (
        message_id TEXT PRIMARY KEY REFERENCES message(id) ON DELETE CASCADE,
        data BLOB NOT NULL
    );
    INSERT INTO body (message_id, data) SELECT id, body FROM message;
    DROP TABLE message;
    ALTER TABLE message_v2 RENAME TO message;
    CREATE INDEX message_due ON message(next_attempt);
    ALTER TABLE recipient ADD COLUMN notified INTEGER NOT NULL DEFAULT 0;
    UPDATE recipient SET notified = 1 WHERE status = 'failed';
    """,
]


def migrate(conn: sqlite3.Connection) -> int:
    return run_migrations(conn, MIGRATIONS, what="spool")


def check_tables(conn: sqlite3.Connection) -> None:
    """SchemaDamaged if a table or column the queue uses is missing: a file whose version
    matches but whose tables were dropped or altered (by hand, another program, a partial
    restore). Found at open, such a file stops the start with one clear line instead of
    failing on the first query of a running relay."""
    for table, wanted in _newest_tables().items():
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not present:
            raise SchemaDamaged(f"spool table {table!r} is missing")
        if missing := sorted(wanted - present):
            raise SchemaDamaged(f"spool table {table!r} lacks column(s) {', '.join(missing)}")


@functools.cache
def _newest_tables() -> dict[str, frozenset[str]]:
    """Table -> columns of a spool made by MIGRATIONS, so the check never lags behind them."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn)
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {name: frozenset(row[1] for row in conn.execute(f"PRAGMA table_info({name})"))
                for name in names}
    finally:
        conn.close()
