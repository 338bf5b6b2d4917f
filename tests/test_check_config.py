"""`relay check-config`, run as an operator runs it (a real process) on a relay folder made
the way the README says: a certificate, a keystore from `keystore init`, a config. Each
test breaks something and reads what the command prints: one `problem:` line per problem,
naming the config file and the key, exit 1; nothing wrong (warnings allowed) is exit 0.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keystore.schema import MIGRATIONS
from relay.checkconfig import config_problems
from relay.config import load_config
from relay.signing import generate_key
from tests.support.procs import keystore_cli
from tests.support.relayrun import write_config, write_secret

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        return [line.removeprefix("problem: ") for line in self.stderr.splitlines()
                if line.startswith("problem: ")]

    @property
    def warnings(self) -> list[str]:
        return [line.removeprefix("warning: ") for line in self.stderr.splitlines()
                if line.startswith("warning: ")]


class Folder:
    """A relay folder that passes the check; tests break one thing (or several) in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = write_config(path, 2525)  # cert.pem/key.pem for relay.test, upstream "sink"
        self.source = self.config.resolve()
        init = keystore_cli(self.config, "init")
        assert init.returncode == 0, init.stderr

    def edit(self, old: str, new: str) -> None:
        text = self.config.read_text()
        assert old in text, old
        self.config.write_text(text.replace(old, new))

    def append(self, text: str) -> None:
        self.config.write_text(self.config.read_text() + text)

    def check(self, *args: str) -> Outcome:
        result = subprocess.run(
            [sys.executable, "-m", "relay", "--config", str(self.config), "check-config", *args],
            capture_output=True, text=True, timeout=60,
        )
        return Outcome(result.returncode, result.stdout, result.stderr)

    def refused(self) -> list[str]:
        """Exit 1; the problem lines (each naming the config file), nothing else on stderr
        but warnings."""
        outcome = self.check()
        assert outcome.returncode == 1, (outcome.stdout, outcome.stderr)
        assert all(line.startswith(("problem: ", "warning: ")) for line in outcome.stderr.splitlines())
        assert outcome.problems, outcome.stderr
        for line in outcome.problems:
            assert line.startswith(f"{self.source}: "), line
        assert f"{self.source}: {count(len(outcome.problems), 'problem')}" in outcome.stdout
        return outcome.problems

    def only_problem(self) -> str:
        problems = self.refused()
        assert len(problems) == 1, problems
        return problems[0].removeprefix(f"{self.source}: ")


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def write_cert(folder: Path, *, names: tuple[str, ...] = ("relay.test",), not_before: datetime.datetime,
               not_after: datetime.datetime, cert: str = "cert.pem", key: str = "key.pem") -> None:
    """A self-signed certificate with chosen names and dates; the key written 0600."""
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    built = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(private, hashes.SHA256())
    )
    write_secret(folder / key, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    ).decode())
    (folder / cert).write_bytes(built.public_bytes(serialization.Encoding.PEM))


def free_port_held() -> socket.socket:
    """A listening socket, as a running relay holds its ports."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


# ------------------------------------------------------------------ good


def test_a_good_config_prints_where_it_would_listen_and_exits_0(tmp_path):
    folder = Folder(tmp_path)
    held = free_port_held()  # check-config binds nothing: a running relay's port stays held
    port = held.getsockname()[1]
    with held:
        folder.edit('submission = ["127.0.0.1:0"]', f'submission = ["127.0.0.1:{port}", "[::1]:2587"]')
        folder.edit('submissions = ["127.0.0.1:0"]', 'submissions = [":2465"]')
        folder.append('\n[metrics]\nlisten = "127.0.0.1:9587"\n[admin]\nlisten = "127.0.0.1:8025"\n')
        outcome = folder.check()
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stderr == ""
    assert outcome.stdout.splitlines() == [
        f"listen: STARTTLS on 127.0.0.1:{port}",
        "listen: STARTTLS on [::1]:2587",
        "listen: implicit TLS on 0.0.0.0:2465",
        "listen: metrics on http://127.0.0.1:9587/metrics",
        "listen: admin on http://127.0.0.1:8025/ (keystore serve)",
        f"{folder.source}: no problems, no warnings",
    ]


def test_json_lists_problems_warnings_and_listeners(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, not_before=NOW - 80 * DAY, not_after=NOW + 3 * DAY)  # a warning only
    outcome = folder.check("--json")
    assert outcome.returncode == 0 and outcome.stderr == ""
    report = json.loads(outcome.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["config"] == str(folder.source)
    assert [w.split(": ")[1:3] for w in report["warnings"]] == [["[tls] cert", str(tmp_path / "cert.pem")]]
    assert report["listeners"] == [
        {"kind": "submission", "host": "127.0.0.1", "port": 0},
        {"kind": "submissions", "host": "127.0.0.1", "port": 0},
    ]
    (tmp_path / "pepper").unlink()
    outcome = folder.check("--json")
    assert outcome.returncode == 1
    assert json.loads(outcome.stdout)["problems"] == [
        f"{folder.source}: [keystore] pepper_file: {tmp_path / 'pepper'}: pepper file not found "
        "(run `keystore init`)"
    ]


# ------------------------------------------------------------------ TLS


def test_an_expired_certificate(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, not_before=NOW - 400 * DAY, not_after=NOW - 10 * DAY)
    problem = folder.only_problem()
    assert problem.startswith(f"[tls] cert: {tmp_path / 'cert.pem'}: expired on ")
    assert "(10 days ago)" in problem


def test_a_certificate_expiring_within_14_days_is_a_warning(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, not_before=NOW - 80 * DAY, not_after=NOW + 5 * DAY + datetime.timedelta(hours=1))
    outcome = folder.check()
    assert outcome.returncode == 0
    assert outcome.problems == []
    assert outcome.warnings == [
        f"{folder.source}: [tls] cert: {tmp_path / 'cert.pem'}: expires on "
        f"{(NOW + 5 * DAY + datetime.timedelta(hours=1)):%Y-%m-%d %H:%M} UTC (in 5 days); renew it"
    ]
    assert f"{folder.source}: no problems, 1 warning" in outcome.stdout


def test_a_certificate_whose_names_do_not_cover_the_hostname(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, names=("relay.test", "*.relay.test"), not_before=NOW - DAY, not_after=NOW + 90 * DAY)
    folder.edit('hostname = "relay.test"', 'hostname = "smtp.mail.relay.test"')  # two labels deep
    assert folder.only_problem() == (
        f"[tls] cert: {tmp_path / 'cert.pem'}: its names (relay.test, *.relay.test) do not cover "
        "[server] hostname 'smtp.mail.relay.test'; clients that check the name refuse it"
    )
    folder.edit('hostname = "smtp.mail.relay.test"', 'hostname = "SMTP.relay.test"')  # the wildcard
    assert folder.check().returncode == 0


def test_a_key_that_does_not_match_the_certificate(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, not_before=NOW - DAY, not_after=NOW + 90 * DAY, cert="other.pem")  # new key.pem
    assert folder.only_problem() == (
        f"[tls] key {tmp_path / 'key.pem'} does not match cert {tmp_path / 'cert.pem'}"
    )


def test_a_world_readable_key_and_a_mismatch_behind_it_are_both_listed(tmp_path):
    folder = Folder(tmp_path)
    key = tmp_path / "key.pem"
    os.chmod(key, 0o644)  # CI runs as root: the rule applies to root too
    assert folder.only_problem() == (
        f"[tls] key: {key}: the TLS private key has mode 0644, which lets other users read or change "
        f"it; run `chmod 600 {key}`"
    )
    # the relay's loader stops at the mode; the check still tries the pair
    write_cert(tmp_path, not_before=NOW - DAY, not_after=NOW + 90 * DAY, cert="other.pem")
    os.chmod(key, 0o644)
    assert [p.split(": ", 1)[1] for p in folder.refused()] == [
        f"[tls] key: {key}: the TLS private key has mode 0644, which lets other users read or change "
        f"it; run `chmod 600 {key}`",
        f"[tls] key {key} does not match cert {tmp_path / 'cert.pem'}",
    ]


# ------------------------------------------------------------------ keystore


def test_a_missing_pepper(tmp_path):
    folder = Folder(tmp_path)
    (tmp_path / "pepper").unlink()
    assert folder.only_problem() == (
        f"[keystore] pepper_file: {tmp_path / 'pepper'}: pepper file not found (run `keystore init`)"
    )


def test_a_pepper_other_users_can_read(tmp_path):
    folder = Folder(tmp_path)
    os.chmod(tmp_path / "pepper", 0o640)
    problem = folder.only_problem()
    assert problem.startswith(f"[keystore] pepper_file: {tmp_path / 'pepper'}: the pepper file has mode 0640")


def test_a_keystore_not_initialised_and_one_from_a_newer_relay(tmp_path):
    folder = Folder(tmp_path)
    with sqlite3.connect(tmp_path / "keystore.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    assert folder.only_problem() == (
        f"[keystore] path: {tmp_path / 'keystore.db'}: keystore schema version 99 is newer than this "
        f"program ({len(MIGRATIONS)})"
    )
    for name in ("keystore.db", "keystore.db-wal", "keystore.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    assert folder.only_problem() == (
        f"[keystore] path: {tmp_path / 'keystore.db'}: keystore not found (run `keystore init`)"
    )


def test_the_check_opens_the_keystore_read_only(tmp_path):
    folder = Folder(tmp_path)
    with sqlite3.connect(tmp_path / "keystore.db") as conn:
        conn.execute("PRAGMA user_version = 0")  # an old keystore: the relay would migrate it
    before = (tmp_path / "keystore.db").read_bytes()
    outcome = folder.check()
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.warnings == [
        f"{folder.source}: [keystore] path: {tmp_path / 'keystore.db'}: keystore schema version 0; the "
        f"relay upgrades it to {len(MIGRATIONS)} when it starts (routes in it are not checked until then)"
    ]
    assert (tmp_path / "keystore.db").read_bytes() == before


def test_keystore_routes_to_an_upstream_the_config_no_longer_has(tmp_path):
    folder = Folder(tmp_path)
    backup = '\n[[upstream]]\nname = "backup"\nhost = "127.0.0.1"\nport = 2526\ntls = "none"\n'
    folder.append(backup)
    added = keystore_cli(folder.config, "mailbox", "add", "alice@example.com", "--route", "backup")
    assert added.returncode == 0, added.stderr
    made = keystore_cli(folder.config, "key", "create", "--mailbox", "alice@example.com", "--name", "crm",
                        "--route", "backup", "--json")
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["id"]
    assert folder.check().returncode == 0
    folder.edit(backup, "")
    assert folder.only_problem() == (
        f"the keystore routes key {key_id}, mailbox alice@example.com to 'backup', which is no "
        "[[upstream]] or [[group]] here"
    )


# ------------------------------------------------------------------ upstreams and DKIM


def test_upstream_password_files_and_ca_files(tmp_path):
    folder = Folder(tmp_path)
    folder.append(
        '\n[[upstream]]\nname = "provider"\nhost = "smtp.provider.test"\nusername = "relay"\n'
        'password_file = "provider-password"\nca_file = "provider-ca.pem"\n'
        '\n[[upstream]]\nname = "second"\nhost = "smtp.second.test"\nusername = "relay"\n'
        'password_file = "second-password"\n'
    )
    (tmp_path / "provider-ca.pem").write_text("not a certificate\n")
    write_secret(tmp_path / "second-password", "s3cret\n")
    os.chmod(tmp_path / "second-password", 0o604)
    password, second = tmp_path / "provider-password", tmp_path / "second-password"
    assert [p.split(": ", 1)[1] for p in folder.refused()] == [
        f"[[upstream]] provider password_file: {password}: file not found",
        f"[[upstream]] provider ca_file: {tmp_path / 'provider-ca.pem'}: no PEM certificate could be "
        "read from it (NO_CERTIFICATE_OR_CRL_FOUND)",
        f"[[upstream]] second password_file: {second}: the password file has mode 0604, which lets "
        f"other users read or change it; run `chmod 600 {second}`",
    ]
    write_secret(password, "s3cret\n")
    os.chmod(second, 0o600)
    (tmp_path / "provider-ca.pem").write_bytes((tmp_path / "cert.pem").read_bytes())
    assert folder.check().returncode == 0


def test_an_admin_listen_address_this_machine_does_not_have(tmp_path):
    """`keystore serve` reads the same file: its address is checked as the relay's are."""
    folder = Folder(tmp_path)
    folder.append('\n[admin]\nlisten = "192.0.2.1:8025"\n')  # TEST-NET-1: on no machine
    assert folder.only_problem().startswith("[admin] listen '192.0.2.1:8025': cannot listen on 192.0.2.1: ")


def test_a_nameserver_that_is_no_address_is_a_problem_not_a_traceback(tmp_path):
    """Found by check-config: the relay's start died with dnspython's ValueError."""
    folder = Folder(tmp_path)
    folder.append('\n[[upstream]]\nname = "direct"\nkind = "mx"\n'
                  '\n[[upstream]]\nname = "direct6"\nkind = "mx"\n'
                  '\n[dns]\nnameservers = ["192.0.2.53", "ns.example.net"]\n')
    problem = folder.only_problem()  # said once, though both upstreams make a resolver
    assert problem.startswith("[dns] nameservers: nameserver ns.example.net is not "), problem
    served = subprocess.run([sys.executable, "-m", "relay", "--config", str(folder.config), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert (served.returncode, served.stderr) == (2, f"relay: {problem}\n")


def test_dkim_keys_broken_unsafe_missing_or_defined_twice(tmp_path):
    folder = Folder(tmp_path)
    generate_key("example.com", "s1", tmp_path / "good.key", "ed25519")
    write_secret(tmp_path / "broken.key",
                 "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    generate_key("example.net", "s1", tmp_path / "open.key", "ed25519")
    os.chmod(tmp_path / "open.key", 0o644)

    def dkim(domain: str, selector: str, key_file: str) -> str:
        return f'\n[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{key_file}"\n'

    folder.append(dkim("example.com", "s1", "good.key") + dkim("example.org", "s1", "broken.key")
                  + dkim("example.net", "s1", "open.key") + dkim("example.info", "s1", "missing.key")
                  + dkim("example.com", "s1", "good.key"))
    assert [p.split(": ", 1)[1] for p in folder.refused()] == [
        f"[[dkim]] example.org key_file: {tmp_path / 'broken.key'}: not a PEM private key",
        f"[[dkim]] example.net key_file: {tmp_path / 'open.key'}: the private key has mode 0644, which "
        f"lets other users read or change it; run `chmod 600 {tmp_path / 'open.key'}`",
        f"[[dkim]] example.info key_file: {tmp_path / 'missing.key'}: file not found (create one with "
        "`relay dkim-keygen`)",
        "[[dkim]] example.com selector 's1': defined twice",
    ]


# ------------------------------------------------------------------ the config file itself


def test_a_file_that_cannot_be_parsed_is_one_problem(tmp_path):
    folder = Folder(tmp_path)
    folder.edit("[routing]", "[routing")
    problem = folder.only_problem()
    assert problem.startswith("not valid TOML: "), problem
    folder.edit("[routing", "[routing]\nfallback = \"sink\"")
    assert folder.only_problem() == "[routing]: unknown key 'fallback'"


def test_a_config_breaking_several_things_lists_every_problem(tmp_path):
    folder = Folder(tmp_path)
    write_cert(tmp_path, not_before=NOW - 400 * DAY, not_after=NOW - 2 * DAY)  # expired
    (tmp_path / "pepper").unlink()
    write_secret(tmp_path / "broken.key", "garbage\n")
    folder.edit('default = "sink"', 'default = "nowhere"')
    folder.edit('submissions = ["127.0.0.1:0"]', 'submissions = ["127.0.0.1:0", "::1:465"]')
    folder.append(
        '\n[metrics]\nlisten = "localhost"\n'
        '\n[[group]]\nname = "pool"\nmembers = ["sink", "ghost"]\nstrategy = "random"\n'
        '\n[[dkim]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "broken.key"\n'
    )
    problems = [p.split(": ", 1)[1] for p in folder.refused()]
    assert problems == [
        "[server] listener '::1:465': an IPv6 address needs brackets: [ADDR]:PORT",
        "[metrics] listen 'localhost': expected HOST:PORT (IPv6 as [ADDR]:PORT)",
        "[[group]] pool strategy: expected failover or round_robin, not 'random'",
        "[[group]] pool members: no [[upstream]] named 'ghost'",
        "[routing] default: no [[upstream]] or [[group]] named 'nowhere'",
        problems[5],  # the expiry, checked below
        f"[[dkim]] example.com key_file: {tmp_path / 'broken.key'}: not a PEM private key",
        f"[keystore] pepper_file: {tmp_path / 'pepper'}: pepper file not found (run `keystore init`)",
    ]
    assert problems[5].startswith(f"[tls] cert: {tmp_path / 'cert.pem'}: expired on ")
    # the relay itself still stops at the first, in one line, as before
    served = subprocess.run([sys.executable, "-m", "relay", "--config", str(folder.config), "serve"],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 2
    assert served.stderr == f"relay: {folder.config}: [server] listener '::1:465': an IPv6 address needs " \
                            "brackets: [ADDR]:PORT\n"


async def test_config_problems_of_a_loaded_config_for_a_reload(tmp_path):
    folder = Folder(tmp_path)
    config = load_config(folder.config)
    assert await config_problems(config) == []
    write_cert(tmp_path, not_before=NOW - 400 * DAY, not_after=NOW - DAY)  # a bad renewal
    problems = await config_problems(config)
    assert len(problems) == 1
    assert problems[0].startswith(f"{folder.source}: [tls] cert: {tmp_path / 'cert.pem'}: expired on ")
