"""TLS: the listeners' server context, and self-signed development certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay import internals
from relay.config import ConfigError, TLSConfig, check_secret_file

__all__ = ["generate_self_signed", "limit_tls_buffers", "server_context"]


# asyncio's pure-Python TLS layer (used for STARTTLS, which aiosmtpd does itself) gives
# every connection a zero-filled 256 KiB read buffer: 256 KiB of RSS per idle session.
# TLS records are at most 16 KiB, so 32 KiB loses nothing but the memory.
_TLS_READ_BUFFER = 32 * 1024


def limit_tls_buffers() -> None:
    internals.limit_tls_read_buffer(_TLS_READ_BUFFER)


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS 1.2+ server context; a missing, unreadable or mismatched pair, or a key that other
    users could read or change, is a clear error."""
    for label, path in (("cert", tls.cert), ("key", tls.key)):
        if not path.is_file():
            raise ConfigError(f"[tls] {label}: {path}: file not found (run `make certs` for a dev pair)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"[tls] {label}: {path}: not readable by this user")
    check_secret_file(tls.key, "[tls] key", "TLS private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"[tls] key {tls.key} does not match cert {tls.cert}") from None
        raise ConfigError(f"[tls] cannot load {tls.cert} / {tls.key}: {exc.reason or exc}") from None
    return context


def generate_self_signed(hostname: str, cert_path: Path, key_path: Path, *, days: int = 365) -> None:
    """Write a self-signed certificate for hostname, localhost, 127.0.0.1 and ::1.

    The key is written mode 0600; both files are replaced atomically.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([hostname, "localhost"]))
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_path, key_pem, 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
