"""Auth key strings: generation, format, checksum, and the keyed hash we store.

Format: ``rak_<id>_<secret><check>``

* ``rak_``   a fixed prefix ("relay auth key") so secret scanners and people recognise it;
* ``<id>``   12 characters of ``a-z2-7`` (60 bits): the public key id, shown in lists/logs;
* ``<secret>`` 43 base62 characters holding 256 random bits from :mod:`secrets`;
* ``<check>`` 6 base62 characters of CRC32 over everything before it, so a mistyped or
  foreign string is refused without touching the database.

Keys are random, so a slow password hash buys nothing: we store
HMAC-SHA256(pepper, id ":" secret). The pepper lives in a separate 0600 file, so a stolen
database alone cannot be used to test guesses.

Admin tokens (`keystore admin-token`, the HTTP API and console) have the same shape with
their own prefix, ``rat_`` ("relay admin token"), so neither can be mistaken for the other
by a person, a secret scanner or the parser.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path

from keystore.secretfile import secret_file_problem

__all__ = [
    "KEY_PREFIX",
    "TOKEN_PREFIX",
    "ParsedKey",
    "PepperError",
    "create_pepper",
    "generate_key",
    "generate_key_id",
    "generate_secret",
    "hash_secret",
    "load_pepper",
    "parse_key",
    "redact_keys",
]

KEY_PREFIX = "rak_"
TOKEN_PREFIX = "rat_"  # noqa: S105 (a prefix, not a secret)
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_LEN, _SECRET_LEN, _CHECK_LEN = 12, 43, 6
_KEY_RES = {
    prefix: re.compile(
        rf"^{prefix}([a-z2-7]{{{_ID_LEN}}})_([0-9A-Za-z]{{{_SECRET_LEN}}})([0-9A-Za-z]{{{_CHECK_LEN}}})$"
    )
    for prefix in (KEY_PREFIX, TOKEN_PREFIX)
}
_ID_RE = re.compile(rf"^[a-z2-7]{{{_ID_LEN}}}$")
# Anything that looks like a key, even mistyped, upper-cased (aiosmtpd upper-cases command
# words it logs) or cut short: the prefix, an id-like word, then the secret part to hide.
_KEYLIKE_RE = re.compile(rf"((?:{KEY_PREFIX}|{TOKEN_PREFIX})[0-9A-Za-z]{{0,64}}_)[0-9A-Za-z]+",
                         re.IGNORECASE)


class PepperError(Exception):
    """The pepper file is missing, unreadable, malformed or readable by others."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"ParsedKey(key_id={self.key_id!r}, secret=...)"


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def generate_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))


def generate_secret() -> str:
    return _base62(secrets.randbits(256), _SECRET_LEN)


def format_key(key_id: str, secret: str, prefix: str = KEY_PREFIX) -> str:
    body = f"{prefix}{key_id}_{secret}"
    return body + _checksum(body)


def generate_key(key_id: str | None = None, prefix: str = KEY_PREFIX) -> tuple[str, str]:
    """Return (full key string, secret part) for a new or rotated key (or admin token)."""
    secret = generate_secret()
    return format_key(key_id or generate_key_id(), secret, prefix), secret


def is_key_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def parse_key(text: str, prefix: str = KEY_PREFIX) -> ParsedKey | None:
    """Split a presented key (or admin token, by its prefix); None for anything malformed
    or with a bad checksum."""
    match = _KEY_RES[prefix].match(text)
    if not match:
        return None
    body = text[: -_CHECK_LEN]
    if not hmac.compare_digest(_checksum(body), match.group(3)):
        return None
    return ParsedKey(match.group(1), match.group(2))


def redact_keys(text: str) -> str:
    """`text` with the secret of every key-shaped string replaced: ``rak_<id>_…``. For
    anything that may reach a log: a client that swaps username and password, or pastes
    its key at a prompt, must not get its secret written down."""
    return _KEYLIKE_RE.sub(r"\1…", text)


def hash_secret(pepper: bytes, key_id: str, secret: str) -> bytes:
    return hmac.new(pepper, f"{key_id}:{secret}".encode("ascii"), hashlib.sha256).digest()


def ledger_key(pepper: bytes) -> bytes:
    """The key naming the AUTH throttle's shared counters (keystore/throttle.slot_digest):
    derived from the pepper, so every node of a cluster has it and the database alone does
    not, and apart from it, so the pepper itself is used for key hashes only."""
    return hmac.new(pepper, b"keyrelay: auth-failure ledger", hashlib.sha256).digest()


def create_pepper(path: Path) -> None:
    """Write a new random pepper, mode 0600 from the first byte, never overwriting one.

    It is written to a private temporary name and then hard-linked into place, so nobody
    (a concurrent `keystore init`) can read a half-written pepper; FileExistsError if one exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(temp, path)
    finally:
        temp.unlink()


def load_pepper(path: Path) -> bytes:
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise PepperError(f"{path}: pepper file not found (run `keystore init`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PepperError(f"{path}: cannot read pepper file: {exc}") from None
    problem = secret_file_problem(path, info, "pepper file")
    if problem is not None:
        raise PepperError(problem)
    try:
        pepper = bytes.fromhex(text)
    except ValueError:
        raise PepperError(f"{path}: pepper file is not hex") from None
    if len(pepper) < 32:
        raise PepperError(f"{path}: pepper is shorter than 32 bytes")
    return pepper
