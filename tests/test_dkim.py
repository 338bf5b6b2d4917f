"""DKIM signing: keys made by generate_key / `relay dkim-keygen`, signatures checked by
dkimpy's verifier against the TXT record served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from relay.config import ConfigError, DkimConfig, load_config
from relay.signing import DkimSigner, generate_key
from tests.support.dns import DnsServer

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Cc: carol@example.org\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the numbers are attached.\r\n"
)
ALGORITHMS = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}


def zone_entry(record: str) -> tuple[tuple[str, str], list[str]]:
    """`s._domainkey.d. IN TXT "..." "..."` -> the DnsServer zone entry serving it."""
    name, klass, rdtype, rdata = record.split(" ", 3)
    assert (klass, rdtype) == ("IN", "TXT")
    return (name, "TXT"), [rdata]


def make_key(folder: Path, domain: str, selector: str, algorithm: str) -> tuple[DkimConfig, str]:
    path = folder / f"{domain}.{selector}.key"
    record = generate_key(domain, selector, path, algorithm)
    return DkimConfig(domain=domain, selector=selector, key_file=path), record


def resolver_for(server: DnsServer):
    """dkimpy's dnsfunc (synchronous), asking the test's DNS server over UDP."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(name, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return dnsfunc


def check(message: bytes, dnsfunc, idx: int) -> bool:
    """dkim.verify checks the topmost signature; idx picks another (False when invalid)."""
    if idx == 0:
        return dkim.verify(message, dnsfunc=dnsfunc)
    try:
        return dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.DKIMException:
        return False


async def verify(message: bytes, records: list[str], idx: int = 0) -> bool:
    zone = dict(zone_entry(r) for r in records)
    async with DnsServer(zone) as server:
        dnsfunc = resolver_for(server)
        # dnsfunc blocks; the DNS server answers from this event loop, so verify in a thread
        ok = await asyncio.to_thread(check, message, dnsfunc, idx)
        assert server.queries, "the verifier never asked DNS for the key"
    return ok


def tags(header: bytes) -> dict[bytes, bytes]:
    value = header.split(b":", 1)[1]
    return {
        k.strip(): re.sub(rb"\s+", b"", v)
        for k, _, v in (part.partition(b"=") for part in value.split(b";")) if k.strip()
    }


# ------------------------------------------------------------------ signing


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_signature_verifies_against_published_record(tmp_path, algorithm):
    entry, record = make_key(tmp_path, "example.com", "mail2026", algorithm)
    header = DkimSigner([entry]).sign(MESSAGE)

    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    assert b"\n" not in header.replace(b"\r\n", b"")  # CRLF only, ready to prepend
    assert header.count(b"DKIM-Signature:") == 1
    sig = tags(header)
    assert sig[b"a"] == ALGORITHMS[algorithm]
    assert sig[b"c"] == b"relaxed/relaxed"
    assert (sig[b"d"], sig[b"s"]) == (b"example.com", b"mail2026")
    signed = set(sig[b"h"].split(b":"))
    assert {b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
            b"content-type"} <= signed
    assert b"x-mailer" not in signed
    assert await verify(header + MESSAGE, [record])


async def test_domain_with_two_keys_gets_both_signatures(tmp_path):
    """RSA + Ed25519 for one domain (RFC 8463 dual signing): one header each, both valid."""
    rsa_entry, rsa_record = make_key(tmp_path, "example.com", "r1", "rsa")
    ed_entry, ed_record = make_key(tmp_path, "example.com", "e1", "ed25519")
    headers = DkimSigner([rsa_entry, ed_entry]).sign(MESSAGE)

    found = [tags(b"DKIM-Signature:" + h) for h in headers.split(b"DKIM-Signature:")[1:]]
    assert [(t[b"s"], t[b"a"]) for t in found] == [(b"r1", b"rsa-sha256"), (b"e1", b"ed25519-sha256")]
    assert await verify(headers + MESSAGE, [rsa_record, ed_record], idx=0)
    assert await verify(headers + MESSAGE, [rsa_record, ed_record], idx=1)


async def test_from_domain_matches_case_insensitively(tmp_path):
    entry, record = make_key(tmp_path, "Example.COM", "s1", "ed25519")
    message = MESSAGE.replace(b"alice@example.com", b"Alice@EXAMPLE.com")
    header = DkimSigner([entry]).sign(message)
    assert tags(header)[b"d"] == b"example.com"
    assert await verify(header + message, [record])


@pytest.mark.parametrize("sender", [
    b"alice@example.org",                          # another domain
    b"alice@mail.example.com",                     # a subdomain: exact match only
    b"alice@com",                                  # a parent
    b"alice@example.com, mallory@example.org",     # two domains: neither may vouch alone
    b"undisclosed-recipients:;",                   # no address
])
def test_no_signature_without_a_key_for_the_from_domain(tmp_path, sender):
    entry, _ = make_key(tmp_path, "example.com", "s1", "ed25519")
    message = MESSAGE.replace(b"Alice <alice@example.com>", sender)
    assert DkimSigner([entry]).sign(message) == b""


def test_no_from_header_and_no_keys_give_no_signature(tmp_path):
    entry, _ = make_key(tmp_path, "example.com", "s1", "ed25519")
    assert DkimSigner([entry]).sign(MESSAGE.replace(b"From: ", b"Reply-To: ")) == b""
    assert DkimSigner([]).sign(MESSAGE) == b""


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_changed_body_or_signed_header_fails_verification(tmp_path, algorithm):
    entry, record = make_key(tmp_path, "example.com", "s1", algorithm)
    signed = DkimSigner([entry]).sign(MESSAGE) + MESSAGE
    assert await verify(signed, [record])
    assert not await verify(signed.replace(b"attached", b"enclosed"), [record])
    assert not await verify(signed.replace(b"Quarterly numbers", b"Quarterly numbers!"), [record])
    # an unsigned header may be changed (the X-Mailer is not in h=)
    assert await verify(signed.replace(b"X-Mailer: test", b"X-Mailer: other"), [record])


async def test_signature_does_not_verify_against_another_key(tmp_path):
    entry, _ = make_key(tmp_path, "example.com", "s1", "rsa")
    _, other_record = make_key(tmp_path / "other", "example.com", "s1", "rsa")
    assert not await verify(DkimSigner([entry]).sign(MESSAGE) + MESSAGE, [other_record])


async def test_relaxed_canonicalisation_survives_whitespace_changes(tmp_path):
    entry, record = make_key(tmp_path, "example.com", "s1", "ed25519")
    signed = DkimSigner([entry]).sign(MESSAGE) + MESSAGE
    refolded = (
        signed.replace(b"Subject: Quarterly numbers", b"subject:   Quarterly\r\n\tnumbers  ")
        .replace(b"Hello Bob,", b"Hello   Bob,  ")
        + b"\r\n\r\n"
    )
    assert await verify(refolded, [record])


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_generate_key_writes_0600_pem_and_matching_record(tmp_path, algorithm):
    path = tmp_path / "keys" / "k.pem"
    record = generate_key("example.com", "sel", path, algorithm)

    assert path.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    (name, _), [rdata] = zone_entry(record)
    assert name == "sel._domainkey.example.com."
    strings = re.findall(r'"([^"]*)"', rdata)
    assert all(len(s) <= 255 for s in strings)
    value = "".join(strings)
    if algorithm == "rsa":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        assert value.startswith("v=DKIM1; k=rsa; p=")
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        assert value.startswith("v=DKIM1; k=ed25519; p=")
        der = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert len(der) == 32
    assert base64.b64decode(value.partition("p=")[2]) == der


def test_generate_key_never_overwrites(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        generate_key("example.com", "sel", path, "ed25519")
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temporary left behind


def test_generate_key_refuses_bad_names_and_algorithms(tmp_path):
    for args in (("exa mple.com", "s1", "rsa"), ("example.com", "s;1", "rsa"), ("example.com", "s1", "dsa")):
        with pytest.raises(ValueError):
            generate_key(args[0], args[1], tmp_path / "k.pem", args[2])
    assert not (tmp_path / "k.pem").exists()


def write_key(path: Path, key, mode: int = 0o600) -> DkimConfig:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL
        if isinstance(key, rsa.RSAPrivateKey) else serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    path.chmod(mode)
    return DkimConfig(domain="example.com", selector="s1", key_file=path)


def refusal(entry: DkimConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        DkimSigner([entry])
    return str(caught.value)


def test_missing_key_file_is_refused(tmp_path):
    message = refusal(DkimConfig(domain="example.com", selector="s1", key_file=tmp_path / "nope.key"))
    assert "[[dkim]] example.com key_file" in message and "file not found" in message


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_readable_or_writable_by_others_is_refused(tmp_path, mode):
    entry = write_key(tmp_path / "k.key", ed25519.Ed25519PrivateKey.generate(), mode)
    message = refusal(entry)
    assert f"mode {mode:04o}" in message and "chmod 600" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_refused(tmp_path):
    entry = write_key(tmp_path / "k.key", ed25519.Ed25519PrivateKey.generate(), 0o000)
    assert "not readable" in refusal(entry)


def test_directory_as_key_file_is_refused(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    assert "not a regular file" in refusal(DkimConfig(domain="example.com", selector="s1", key_file=folder))


@pytest.mark.parametrize("content", [
    b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
])
def test_garbage_key_file_is_refused(tmp_path, content):
    path = tmp_path / "k.key"
    path.write_bytes(content)
    path.chmod(0o600)
    assert "not a PEM private key" in refusal(DkimConfig(domain="example.com", selector="s1", key_file=path))


def test_wrong_kind_of_key_is_refused(tmp_path):
    entry = write_key(tmp_path / "ec.key", ec.generate_private_key(ec.SECP256R1()))
    assert "expected an RSA or Ed25519 private key" in refusal(entry)
    public_only = tmp_path / "pub.pem"
    public_only.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    public_only.chmod(0o600)
    assert "not a PEM private key" in refusal(
        DkimConfig(domain="example.com", selector="s1", key_file=public_only))


def test_encrypted_key_is_refused(tmp_path):
    path = tmp_path / "enc.key"
    path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    path.chmod(0o600)
    assert "encrypted" in refusal(DkimConfig(domain="example.com", selector="s1", key_file=path))


def test_bad_names_and_duplicate_selectors_are_refused(tmp_path):
    entry, _ = make_key(tmp_path, "example.com", "s1", "ed25519")
    bad_domain = DkimConfig(domain="example .com", selector="s1", key_file=entry.key_file)
    assert "domain" in refusal(bad_domain) and "not a DNS name" in refusal(bad_domain)
    with pytest.raises(ConfigError, match="defined twice"):
        DkimSigner([entry, DkimConfig(domain="EXAMPLE.com", selector="s1", key_file=entry.key_file)])


# ------------------------------------------------------------------ relay dkim-keygen


def keygen(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=60,
    )


def printed_record(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "._domainkey." in line)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_cli_keygen_key_record_and_stanza_work_end_to_end(tmp_path, algorithm):
    """The printed [[dkim]] stanza, pasted into a config, signs mail the printed record verifies."""
    config = tmp_path / "etc" / "relay.toml"
    config.parent.mkdir()
    result = await asyncio.to_thread(
        keygen, tmp_path, "--config", str(config), "dkim-keygen", "Example.com", "k1",
        "--algorithm", algorithm)
    assert result.returncode == 0, result.stderr
    key = tmp_path / "etc" / "dkim" / "example.com.k1.key"  # default: beside the config
    assert key.stat().st_mode & 0o777 == 0o600
    record = printed_record(result.stdout)
    assert record.startswith('k1._domainkey.example.com. IN TXT "v=DKIM1; k=' + algorithm)

    stanza = result.stdout[result.stdout.index("[[dkim]]"):]
    assert 'key_file = "dkim/example.com.k1.key"' in stanza
    config.write_text('[keystore]\npath = "keystore.db"\npepper_file = "pepper"\n\n' + stanza)
    signer = DkimSigner(load_config(config).dkim)
    header = signer.sign(MESSAGE)
    assert tags(header)[b"a"] == ALGORITHMS[algorithm]
    assert await verify(header + MESSAGE, [record])


def test_cli_keygen_without_config_writes_to_current_directory(tmp_path):
    result = keygen(tmp_path, "dkim-keygen", "example.com", "s1", "--algorithm", "ed25519")
    assert result.returncode == 0, result.stderr
    key = tmp_path / "dkim" / "example.com.s1.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert f'key_file = "{key}"' in result.stdout  # absolute: no config folder to be relative to
    assert 'IN TXT "v=DKIM1; k=ed25519; p=' in printed_record(result.stdout)


def test_cli_keygen_out_and_refusal_to_overwrite(tmp_path):
    out = tmp_path / "custom" / "my.key"
    first = keygen(tmp_path, "dkim-keygen", "example.com", "s1", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    assert 'k=rsa; p=' in printed_record(first.stdout)
    before = out.read_bytes()

    again = keygen(tmp_path, "dkim-keygen", "example.com", "s1", "--out", str(out))
    assert again.returncode == 1
    assert again.stdout == ""
    assert "already exists" in again.stderr and str(out) in again.stderr
    assert out.read_bytes() == before


def test_cli_keygen_usage_errors(tmp_path):
    bad_algorithm = keygen(tmp_path, "dkim-keygen", "example.com", "s1", "--algorithm", "dsa")
    assert bad_algorithm.returncode == 2 and "invalid choice" in bad_algorithm.stderr
    bad_selector = keygen(tmp_path, "dkim-keygen", "example.com", "s 1")
    assert bad_selector.returncode == 2 and "not a DNS name" in bad_selector.stderr
    assert not (tmp_path / "dkim").exists() or not any((tmp_path / "dkim").iterdir())
