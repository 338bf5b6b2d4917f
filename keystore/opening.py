"""One way to open the keystore, whichever engine holds it: `[keystore] path` (sqlite, the
embedded default) or `[keystore] url` (PostgreSQL, shared by several relays). Every caller
(the relay, the `keystore` CLI, the admin HTTP API and console, `relay check-config`) opens
it here, so they cannot disagree about which database a config means.

The PostgreSQL driver is imported only for a url: a `keystore` command on a sqlite file
(every one a new process) does not pay for loading psycopg.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import TYPE_CHECKING

from keystore import keys
from keystore.errors import KeystoreUnavailable
from keystore.store import KeyStore

if TYPE_CHECKING:
    from keystore.postgresdb import PostgresDatabase

__all__ = ["open_keystore", "pepper_matches", "postgres_schema_version", "where", "wrong_pepper"]


def where(*, path: Path | None, url: str | None) -> str:
    """The keystore as a person may read it: the path, or the URL without its password."""
    if not url:
        return str(path)
    from keystore.pg import redact

    return redact(url)


async def open_keystore(
    *, path: Path | None = None, url: str | None = None, pepper_file: Path,
    default_key_limit: int = 100, create: bool = False, max_connections: int = 8,
) -> KeyStore:
    """The keystore at `path` (sqlite) or `url` (PostgreSQL): exactly one of them.
    `create`: make the tables (and the pepper, when there is none yet and no keystore
    either: a new pepper beside existing keys would make every one of them invalid)."""
    if (path is None) == (url is None):
        raise ValueError("a keystore is one path or one url")
    if url is None:
        assert path is not None
        return await KeyStore.open(path, pepper_file, default_key_limit=default_key_limit,
                                   create=create)
    from keystore import pg

    if not pg.is_postgres_url(url):
        raise KeystoreUnavailable(f"{pg.redact(url)}: not a postgresql:// URL")
    database = await _postgres(url, max_connections)
    try:
        if create and not pepper_file.exists():
            if await database.schema_version() > 0:
                raise keys.PepperError(f"{pepper_file}: pepper file missing for the existing "
                                       f"keystore {database.where}; restore it")
            try:
                keys.create_pepper(pepper_file)
            except FileExistsError:
                pass  # a concurrent `keystore init` wrote it first: use that one
        pepper = keys.load_pepper(pepper_file)
        await database.prepare(create=create)
        await _check_pepper(database, pepper, pepper_file)
    except BaseException:
        await database.close()
        raise
    return KeyStore(database, pepper, default_key_limit)


async def _check_pepper(database: PostgresDatabase, pepper: bytes, pepper_file: Path) -> None:
    """Every node must hash with the keystore's pepper: one with another would take every
    key for a wrong secret (and fill the cluster's AUTH ledger with its refusals, shutting
    the keys' holders out at every node), and keys it made would fail everywhere else. The
    first node to open the keystore records its pepper's fingerprint; a node whose pepper
    does not match it is refused. (Safe to store: an HMAC under a 256-bit secret.)"""
    matches = await pepper_matches(database, pepper)
    if matches is None:
        await database.execute("INSERT INTO pepper_check (fingerprint, recorded) VALUES (?, ?) "
                               "ON CONFLICT DO NOTHING", (_fingerprint(pepper), time.time()))
        matches = await pepper_matches(database, pepper)
    if not matches:
        raise keys.PepperError(wrong_pepper(pepper_file, database.where))


def wrong_pepper(pepper_file: Path, keystore: str) -> str:
    return (f"{pepper_file}: not this keystore's pepper ({keystore} was opened with another): "
            "every relay and keystore command on it needs the same pepper file; copy it from a "
            "node that works (with this one, no key would be valid)")


async def pepper_matches(database: PostgresDatabase, pepper: bytes) -> bool | None:
    """Whether `pepper` is the one the keystore recorded (None: none recorded yet); read
    only, for `relay check-config` too."""
    rows = await database.fetch("SELECT fingerprint FROM pepper_check")
    if not rows:
        return None
    return hmac.compare_digest(bytes(rows[0][0]), _fingerprint(pepper))


def _fingerprint(pepper: bytes) -> bytes:
    return hmac.new(pepper, b"keyrelay keystore pepper check", hashlib.sha256).digest()


async def postgres_schema_version(url: str) -> int:
    """The version of the keystore tables at `url` (0: none yet), read without changing
    anything; KeystoreUnavailable if the server cannot be reached."""
    database = await _postgres(url, 1)
    try:
        return await database.schema_version()
    finally:
        await database.close()


async def _postgres(url: str, max_connections: int) -> PostgresDatabase:
    from keystore.postgresdb import PostgresDatabase

    return await PostgresDatabase.connect(url, max_size=max_connections)
