"""DKIM signing (RFC 6376) of submitted messages, by the domain of their From: header.

    signer = DkimSigner(config.dkim)          # loads and checks every key; ConfigError if unusable
    header = signer.sign(message)             # b"DKIM-Signature: ...\r\n" (or b"") to prepend

A domain may have several [[dkim]] entries (say an RSA and an Ed25519 key, as RFC 8463
recommends while receivers catch up): the message then gets one signature from each.

`generate_key` makes a key pair for `relay dkim-keygen`: the private key as a 0600 PEM
file and the TXT record to publish at `<selector>._domainkey.<domain>`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import errno
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from keystore.secretfile import secret_file_problem
from relay.config import ConfigError, DkimConfig

__all__ = ["DkimSigner", "generate_key", "txt_record"]

ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 2048
_MIN_RSA_BITS = 1024  # RFC 8301 section 3.2: signers MUST use at least 1024 bits
_CANONICALIZE = (b"relaxed", b"relaxed")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_LABELS = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
_TXT_CHUNK = 255  # a DNS character-string holds at most 255 octets

log = logging.getLogger("relay.dkim")


@dataclass(frozen=True)
class _Key:
    domain: bytes
    selector: bytes
    algorithm: bytes  # dkimpy's signature_algorithm
    private: bytes  # in the form dkimpy takes: PKCS#1 PEM for RSA, base64 raw seed for Ed25519


class DkimSigner:
    """Signs messages with the keys of `Config.dkim`, chosen by the From: header's domain."""

    def __init__(self, entries: Iterable[DkimConfig]) -> None:
        self._keys: dict[str, list[_Key]] = {}
        seen: set[tuple[str, str]] = set()
        for entry in entries:
            where = f"[[dkim]] {entry.domain}"
            domain = _check_name(entry.domain, f"{where} domain").lower()
            selector = _check_name(entry.selector, f"{where} selector")
            if (domain, selector.lower()) in seen:
                raise ConfigError(f"{where} selector {selector!r}: defined twice")
            seen.add((domain, selector.lower()))
            algorithm, private = _load_key(entry.key_file, f"{where} key_file")
            key = _Key(domain.encode(), selector.encode(), algorithm, private)
            _self_test(key, f"{where} key_file: {entry.key_file}")
            self._keys.setdefault(domain, []).append(key)

    @property
    def domains(self) -> list[str]:
        return sorted(self._keys)

    def signs(self, header: bytes) -> bool:
        """Whether a message with this header block would get a signature: its From:
        domain has a key. Lets a big message on disk skip being read back whole."""
        domain = from_domain(header) if self._keys else None
        return domain is not None and domain in self._keys

    async def sign_async(self, message: bytes) -> bytes:
        """`sign` off the event loop (it is CPU-bound); free when no key is configured."""
        if not self._keys:
            return b""
        return await asyncio.to_thread(self.sign, message)

    def sign(self, message: bytes) -> bytes:
        """DKIM-Signature header field(s), CRLF-terminated, to prepend to message; b"" when
        the From: domain has no key (or From: names no single domain). Synchronous and
        CPU-bound: roughly 25 ms per MB of message per key (dkimpy is pure Python).

        message: the whole message with CRLF line endings, including every header to be
        signed (add Date/Message-ID before signing, so they are covered).
        """
        domain = from_domain(message)
        keys = self._keys.get(domain) if domain else None
        if not keys:
            return b""
        try:
            parsed = dkim.DKIM(message, linesep=b"\r\n")  # parsed once for all of the domain's keys
            return b"".join(
                parsed.sign(key.selector, key.domain, key.private,
                            signature_algorithm=key.algorithm, canonicalize=_CANONICALIZE)
                for key in keys
            )
        except dkim.DKIMException as exc:
            # dkimpy refuses header blocks it cannot parse; such a message goes out unsigned
            log.warning("DKIM: not signing a message from %s: %s", domain, exc)
            return b""


def from_domain(message: bytes) -> str | None:
    """The domain (lower case) of the From: header's address(es); None if there is none, or
    if the addresses name more than one domain (no domain can then vouch for the message)."""
    end = message.find(b"\r\n\r\n")
    block = message if end < 0 else message[: end + 2]
    headers = _HEADER_PARSER.parsebytes(block)
    domains = {
        address.rpartition("@")[2].lower()
        for _, address in email.utils.getaddresses([str(v) for v in headers.get_all("From", [])])
        if "@" in address
    }
    if len(domains) != 1:
        return None
    return domains.pop() or None


def _check_name(value: str, where: str) -> str:
    if not _LABELS.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a DNS name (letters, digits, '-', '_', dots; "
            "an internationalised domain in its xn-- form)"
        )
    return value


def _load_key(path: Path, where: str) -> tuple[bytes, bytes]:
    """Read a PEM private key that only this user can read; return dkimpy's (algorithm, key)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path}: file not found (create one with `relay dkim-keygen`)") from None
    except PermissionError:
        raise ConfigError(f"{where}: {path}: not readable by this user") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        problem = secret_file_problem(path, info, "private key")
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        try:
            data = os.read(fd, 1 << 20)
        except OSError as exc:
            raise ConfigError(f"{where}: {path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: a relay starting unattended has no passphrase to give
        raise ConfigError(f"{where}: {path}: the key is encrypted; store it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{where}: {path}: not a PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ConfigError(
                f"{where}: {path}: a {key.key_size}-bit RSA key is too weak (at least {_MIN_RSA_BITS}, "
                f"{RSA_BITS} recommended)"
            )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return b"rsa-sha256", pem
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption(),
        )
        return b"ed25519-sha256", base64.b64encode(seed)
    raise ConfigError(f"{where}: {path}: expected an RSA or Ed25519 private key, not {type(key).__name__}")


def _self_test(key: _Key, where: str) -> None:
    """Sign a tiny message once, so a key dkimpy cannot use fails at start, not per message."""
    probe = b"From: probe@" + key.domain + b"\r\nSubject: probe\r\n\r\nprobe\r\n"
    try:
        dkim.sign(probe, key.selector, key.domain, key.private,
                  canonicalize=_CANONICALIZE, signature_algorithm=key.algorithm)
    except dkim.DKIMException as exc:
        raise ConfigError(f"{where}: cannot sign with this key: {exc}") from None


def txt_record(domain: str, selector: str, public_key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """`<selector>._domainkey.<domain>. IN TXT "v=DKIM1; k=...; p=..."`, in zone-file syntax;
    split into several quoted strings when longer than DNS allows in one (a 2048-bit RSA key)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        kind = "ed25519"
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        kind = "rsa"
        raw = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    value = f"v=DKIM1; k={kind}; p={base64.b64encode(raw).decode()}"
    chunks = " ".join(f'"{value[i:i + _TXT_CHUNK]}"' for i in range(0, len(value), _TXT_CHUNK))
    return f"{selector}._domainkey.{domain}. IN TXT {chunks}"


def generate_key(domain: str, selector: str, key_path: Path | str, algorithm: str = "rsa") -> str:
    """Write a new private key (PEM, mode 0600) to key_path and return its TXT record.

    Never replaces a file: an existing key_path raises FileExistsError, and the key
    appears there complete or not at all. ValueError for a bad name or algorithm.
    """
    for label, value in (("domain", domain), ("selector", selector)):
        try:
            _check_name(value, label)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
    if algorithm == "rsa":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=RSA_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    )
    _write_new(Path(key_path), pem)
    return txt_record(domain.lower(), selector, key.public_key())


def _write_new(path: Path, data: bytes) -> None:
    """Write path mode 0600 without ever replacing an existing file (link(2) refuses)."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)  # exactly 0600 whatever the umask
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, "refusing to overwrite an existing file", str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
