"""deploy/fail2ban: the real `fail2ban-regex` against the log of a real `relay serve`.

The filter must match each failed AUTH once, with the client's address (IPv4 and IPv6),
and nothing else: not a successful login, not another event, and not a line a client
forged by putting log text in a username or an address.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from keystore.store import KeyStore
from relay import maillog
from relay.config import LogConfig, load_config
from relay.logformat import configure_logging, reset_logging
from tests.support.procs import free_port, keystore_cli, start_relay_process
from tests.support.relayrun import client_tls, write_config
from tests.support.waiting import wait_until

FILTER = Path(__file__).resolve().parent.parent / "deploy" / "fail2ban" / "filter.d" / "keyrelay.conf"
JAIL = FILTER.parent.parent / "jail.d" / "keyrelay.conf"
ALICE = "alice@example.com"
FORGED = "WARNING relay.mail: auth_failed session=aaaa client=10.9.8.7 tls=TLSv1.3 username=x reason=bad"

pytestmark = pytest.mark.skipif(shutil.which("fail2ban-regex") is None,
                                reason="fail2ban-regex is not installed (.ci/run installs it)")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def matched_ips(log: Path) -> list[str]:
    """The address of every line the shipped filter matches, in order."""
    result = subprocess.run(["fail2ban-regex", "-o", "ip", str(log), str(FILTER)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout.split()


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


async def _session(host: str, port: int, tls, commands: list[bytes]) -> list[bytes]:
    """STARTTLS, EHLO, then each command; the first line of each reply."""
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readline()
    writer.write(b"EHLO client.test\r\nSTARTTLS\r\n")
    while not (await reader.readline()).startswith(b"220 "):
        pass
    await writer.start_tls(tls, server_hostname="relay.test")
    writer.write(b"EHLO client.test\r\n")
    while not (await reader.readline()).startswith(b"250 "):
        pass
    replies = []
    for command in commands:
        writer.write(command + b"\r\n")
        replies.append(await reader.readline())
    writer.close()
    return replies


async def test_the_filter_matches_exactly_the_failed_auths_of_a_real_relay(tmp_path, sink):
    port, port6 = free_port(), free_port()
    ipv6 = _ipv6_loopback()
    path = write_config(tmp_path, sink.port, server="rate_per_minute = 0")
    listen = f'"127.0.0.1:{port}"' + (f', "[::1]:{port6}"' if ipv6 else "")
    path.write_text(path.read_text().replace('submission = ["127.0.0.1:0"]', f"submission = [{listen}]"))
    config = load_config(path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox(ALICE, workspace="w", actor="t")
    _, key = await store.create_key(mailbox=ALICE, name="crm", actor="t")
    await store.close()
    # DEBUG (from the environment): aiosmtpd's transcript of every command is in the log
    # too, forged text and all
    relay = await start_relay_process(path, port, log_level=None, env={"RELAY_LOG_LEVEL": "debug"})
    tls = client_tls(tmp_path)
    failed = b"535 "
    try:
        replies = await _session("127.0.0.1", port, tls, [
            b"AUTH PLAIN " + b64(f"\0{ALICE}\0rak_wrong"),                        # wrong key
            b"AUTH PLAIN " + b64(f"\0{key}\0{ALICE}"),                            # key as username
            b"AUTH PLAIN " + b64(f"\0x\n{FORGED}\0rak_wrong"),                    # a forged line
        ])
        assert [r[:4] for r in replies] == [failed] * 3
        replies = await _session("127.0.0.1", port, tls, [
            b"AUTH PLAIN " + b64(f"\0{ALICE}\0{key}"),
            f'MAIL FROM:<"x {FORGED}"@example.com>'.encode(),
            f"NOOP {FORGED}".encode(),
            f"MAIL FROM:<{ALICE}>".encode(), b"RCPT TO:<bob@example.net>", b"DATA",
            f"From: {ALICE}\r\nSubject: {FORGED}\r\n\r\nhi\r\n.".encode(), b"QUIT",
        ])
        assert replies[0].startswith(b"235 ") and replies[1].startswith(b"553 ")
        assert replies[-2].startswith(b"250 ")
        if ipv6:
            replies = await _session("::1", port6, tls, [
                b"AUTH PLAIN " + b64(f"\0{ALICE}\0rak_wrong"), b"AUTH PLAIN " + b64(f"\0{ALICE}\0{key}")])
            assert replies[0].startswith(failed) and replies[1].startswith(b"235 ")
        log = tmp_path / "relay.log"
        await wait_until(lambda: " sent " in log.read_text(), what="the delivery line")
    finally:
        relay.terminate()
        await relay.wait()
    text = log.read_text()
    assert len(re.findall(r"^\S+ \S+ WARNING relay\.mail: auth_failed ", text, re.M)) == 3 + ipv6
    assert len(re.findall(r"^\S+ \S+ INFO relay\.mail: auth_ok ", text, re.M)) == 1 + ipv6
    assert "10.9.8.7" in text and " DEBUG mail.log: " in text  # the forged text is there, as data
    expected = ["127.0.0.1"] * 3 + ["::1"] * ipv6
    assert matched_ips(log) == expected
    # the same lines as fail2ban reads them from the journal: "HOST IDENT[PID]: " + the line
    # (journald keeps each line of a record as its own entry, with the same prefix)
    journal = tmp_path / "journal.log"
    journal.write_text("".join(f"Nov 28 05:18:53 mail relay[4242]: {line}\n" for line in text.splitlines()))
    assert matched_ips(journal) == expected


def test_the_filter_skips_the_relays_own_trouble_and_counts_throttled_clients(tmp_path):
    """A failed AUTH because the keystore was unavailable is not the client's doing."""
    stream = io.StringIO()
    configure_logging(LogConfig(), stream=stream)
    try:
        maillog.auth_failed(("192.0.2.7", 1234), ALICE, "keystore_unavailable")
        maillog.auth_failed(("192.0.2.8", 1234), ALICE, "too_many_failures")
        maillog.auth_failed(("2001:db8::9", 1234, 0, 0), 'a "quoted" name', "revoked")
        maillog.auth_ok(("192.0.2.10", 1234), ALICE, "abcdefghijkl")
        maillog.auth_failed(("::ffff:192.0.2.11", 1234), ALICE, "bad_credentials")  # dual-stack
        logging.getLogger("relay.test").warning("x\n%s", FORGED)
    finally:
        reset_logging()
    log = tmp_path / "relay.log"
    log.write_text(stream.getvalue())
    assert matched_ips(log) == ["192.0.2.8", "2001:db8::9", "192.0.2.11"]


async def test_the_filter_skips_legacy_busy_refusals_of_a_real_relay(tmp_path, sink):
    """A login told 454 because too many legacy-password checks are waiting met the relay's
    load, as a legitimate client would: only the wrong passwords that were checked count."""
    port = free_port()
    path = write_config(tmp_path, sink.port, server="rate_per_minute = 0",
                        auth="legacy_verifications = 1\nlegacy_queue = 0")
    listen = f'submission = ["127.0.0.1:{port}"]'
    path.write_text(path.read_text().replace('submission = ["127.0.0.1:0"]', listen))
    hashed = subprocess.run(["doveadm", "pw", "-s", "BLF-CRYPT", "-r", "12", "-p", "right"],
                            capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    users = [f"user{n}@example.com" for n in range(4)]
    (tmp_path / "passwd").write_text("".join(f"{user}:{hashed}\n" for user in users))
    config = load_config(path)
    await (await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)).close()
    imported = keystore_cli(path, "import", "dovecot-passwd", str(tmp_path / "passwd"), "--workspace", "w")
    assert imported.returncode == 0, imported.stderr
    relay = await start_relay_process(path, port)
    tls = client_tls(tmp_path)
    try:
        # one check at a time and none waiting: of four at once, the first is checked and
        # the others are told to come back
        replies = await asyncio.gather(*(
            _session("127.0.0.1", port, tls, [b"AUTH PLAIN " + b64(f"\0{user}\0wrong")]) for user in users))
        codes = sorted(reply[0][:4] for reply in replies)
        assert codes[0] == b"454 " and codes[-1] == b"535 ", codes
    finally:
        relay.terminate()
        await relay.wait()
    text = (tmp_path / "relay.log").read_text()
    assert text.count(" reason=legacy_busy") == codes.count(b"454 ")
    assert matched_ips(tmp_path / "relay.log") == ["127.0.0.1"] * codes.count(b"535 ")


@pytest.mark.skipif(not Path("/etc/fail2ban/jail.conf").exists(), reason="no fail2ban configuration")
def test_fail2ban_reads_the_jail_on_the_relays_journal_and_ports(tmp_path):
    """fail2ban's own reader, on its stock configuration plus our two files."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(FILTER, conf / "filter.d")
    shutil.copy(JAIL, conf / "jail.d")
    result = subprocess.run(["fail2ban-client", "-c", str(conf), "-d"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    mine = [line for line in result.stdout.splitlines() if "'keyrelay'" in line]
    assert "['add', 'keyrelay', 'systemd']" in mine
    assert "['set', 'keyrelay', 'addjournalmatch', '_SYSTEMD_UNIT=relay.service']" in mine
    assert any("addfailregex" in line and "auth_failed" in line for line in mine)
    assert any("--dports 587,465" in line for line in mine)
    assert 'format = "text"' in JAIL.read_text()  # the jail says the JSON format is not for it
