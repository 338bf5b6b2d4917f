"""Legacy passwords for the admin API and console tests: hashes made by the real tools
(`htpasswd -nbB`: bcrypt, fast; `doveadm pw -s SHA512-CRYPT`), read by the real file
readers (keystore/passwdfile.py) and imported by the real keystore, as `keystore import`
does, but in one step with no file on disk. One hash serves many mailboxes: the file
line is `ADDRESS:HASH`, whatever user the tool was given."""

from __future__ import annotations

import subprocess
from collections.abc import Awaitable, Callable, Iterable

from keystore.passwdfile import read_dovecot_passwd, read_htpasswd
from keystore.store import KeyStore, LegacyImport

__all__ = ["bcrypt_hash", "dovecot_hash", "import_lines"]


def bcrypt_hash(password: str) -> str:
    """`htpasswd -nbB user PASSWORD`'s hash (the part after `user:`)."""
    done = subprocess.run(["htpasswd", "-nbB", "user", password], capture_output=True, text=True,
                          check=True, timeout=30)
    return done.stdout.strip().partition(":")[2]


def dovecot_hash(scheme: str, password: str) -> str:
    """`doveadm pw -s SCHEME -p PASSWORD`: `{SCHEME}hash`, as a Dovecot passwd-file holds it."""
    done = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True,
                          text=True, check=True, timeout=30)
    return done.stdout.strip()


async def import_lines(open_store: Callable[[], Awaitable[KeyStore]], lines: Iterable[tuple[str, str]], *,
                       workspace: str, dovecot: bool = False) -> LegacyImport:
    """Import (address, hash) pairs into `workspace` as one file of either format; every
    line must be accepted."""
    text = "".join(f"{address}:{hashed}\n" for address, hashed in lines)
    entries, bad = (read_dovecot_passwd if dovecot else read_htpasswd)(text)
    assert not bad, bad
    store = await open_store()
    try:
        return await store.import_legacy(entries, source="test-passwd", actor="migration",
                                         workspace=workspace)
    finally:
        await store.close()
