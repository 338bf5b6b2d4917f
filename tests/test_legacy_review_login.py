"""Review of issue 13's login path and its limits (legacy passwords), as a sprayer, a CRM
behind a shared address and an operator stopping the relay meet it: a key login is never
held back by legacy-password checks in flight from its address, and the check processes
do not outlive the relay."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path

import aiosmtplib
import pytest

from keystore.legacy import LEGACY_FAILURE_FLOOR
from keystore.models import Identity, Reason
from keystore.passwdfile import read_dovecot_passwd, read_htpasswd
from keystore.throttle import client_network
from tests.support.legacyseed import bcrypt_hash, dovecot_hash
from tests.support.procs import check_processes, free_port, start_relay_process
from tests.support.waiting import wait_until
from tests.test_legacy_hostile import (
    RIGHT,
    Client,
    doveadm,
    import_passwords,
    plain,
    prober_key,
    relay_config,
    try_login,
)


async def auth_plain(client: aiosmtplib.SMTP, username: str, secret: str) -> tuple[int, str]:
    token = base64.b64encode(f"\0{username}\0{secret}".encode())
    code, message = await client.execute_command(b"AUTH", b"PLAIN", token)
    return code, message


async def test_a_key_login_is_not_held_back_by_password_checks_in_flight_from_its_address(relay_with):
    """A CRM's shared egress address, one failure short of its ceiling: a user there types
    a wrong legacy password (answered no sooner than LEGACY_FAILURE_FLOOR). The ceiling's
    wait is for checks that compute a hash; a key computes none, so the CRM's key login
    must not wait the half second for the password check to end."""
    async with relay_with(auth="max_failures = 2\nmax_failures_per_address = 2") as h:
        await h.mailbox("bob@example.com")
        await h.mailbox("carol@example.com")
        bob = await h.key("bob@example.com")
        entries, bad = read_htpasswd(f"carol@example.com:{bcrypt_hash('carols old one')}\n")
        assert not bad
        await h.relay.store.import_legacy(entries, source="test", actor="test", workspace="default")
        stale, typist, crm = await h.client(), await h.client(), await h.client()
        try:
            # a stale key of some customer: one failure counted against the address
            assert (await auth_plain(stale, "customer@example.com", bob[:-4] + "AAAA"))[0] == 535
            typing = asyncio.ensure_future(auth_plain(typist, "carol@example.com", "carols new one"))
            limiter = h.relay._authenticator._limiter
            await wait_until(lambda: limiter._windows[("net", client_network("127.0.0.1"), "")].pending == 1,
                             what="the password check in flight")
            started = time.monotonic()
            assert (await auth_plain(crm, "bob@example.com", bob))[0] == 235
            took = time.monotonic() - started
            assert not typing.done(), f"the key login waited for the password check ({took:.2f} s)"
            assert took < LEGACY_FAILURE_FLOOR / 2
            assert (await typing)[0] == 535
        finally:
            for client in (stale, typist, crm):
                client.close()


# ----------------------------------------------------------------- the check processes


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped by init, is not)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_the_check_processes_end_with_the_relay_even_killed_mid_check(tmp_path, sink, how):
    """A relay killed (the OOM killer, `kill -9`, a container stopped hard) while a password
    check runs: its check processes must not live on, each holding a spawned interpreter
    (and with ARGON2 its memory), one set more at every restart. Stopped (`relay stop`,
    SIGTERM) mid-check, it exits promptly and leaves none either."""
    port, metrics_port = free_port(), free_port()
    config = relay_config(tmp_path, sink.port, port, metrics_port, auth="max_failures = 50")
    await prober_key(config)  # creates the keystore (and its pepper)
    await import_passwords(config, [f"slow@example.com:{doveadm('BLF-CRYPT', RIGHT, '-r', '14')}",
                                    f"fast@example.com:{doveadm('BLF-CRYPT', RIGHT)}"])
    proc = await start_relay_process(config, port)
    pids: set[int] = set()
    try:
        # the pool starts at the first legacy login
        assert (await try_login(tmp_path, port, "fast@example.com", RIGHT))[0] == 235
        # a check in flight (cost 14: about a second of a core) when the relay goes
        client = await Client.connect(tmp_path, port)
        client.writer.write(b"AUTH PLAIN " + plain("slow@example.com", "a wrong guess") + b"\r\n")
        await client.writer.drain()
        await wait_until(lambda: check_processes(proc.pid), what="the check processes")
        pids = check_processes(proc.pid)
        started = time.monotonic()
        if how == "SIGKILL":
            proc.kill()
        else:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        client.close()
        await wait_until(lambda: not alive(pids), timeout=10, what="the check processes to end")
        assert time.monotonic() - started < 10
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in alive(pids):  # before the fix: they live on (reparented to init)
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------- enumeration by time


async def test_while_checks_queue_a_mailbox_without_a_password_is_answered_no_sooner(relay_with):
    """A busy pool (checks waiting their turn, here made by the prober himself: guesses
    against a mailbox he knows has a password) must not tell the time of a mailbox with a
    password (it waits for its turn, then its hash) from one without (which had no turn to
    wait for, and was answered at the bare LEGACY_FAILURE_FLOOR)."""
    hashed = await asyncio.to_thread(doveadm, "BLF-CRYPT", RIGHT, "-r", "11")
    auth = "legacy_verifications = 1\nmax_failures = 50\nmax_failures_per_address = 500"
    async with relay_with(auth=auth, server="rate_per_minute = 0") as h:
        await import_passwords(h.config_path, [f"known@example.com:{hashed}", f"target@example.com:{hashed}"])
        verifier = h.relay.store.legacy
        loaders = await asyncio.gather(*(Client.connect(h.folder, h.port) for _ in range(12)))
        probes = await asyncio.gather(*(Client.connect(h.folder, h.port) for _ in range(2)))
        try:
            load = [asyncio.ensure_future(client.auth("known@example.com", "a wrong guess"))
                    for client in loaders]
            await wait_until(lambda: verifier._waiting >= 8, what="checks waiting their turn")

            async def timed(client: Client, username: str) -> tuple[float, tuple[int, str]]:
                started = time.monotonic()
                answer = await client.auth(username, "a wrong guess")
                return time.monotonic() - started, answer

            (with_password, a), (without, b) = await asyncio.gather(
                timed(probes[0], "target@example.com"), timed(probes[1], "nobody@example.com"))
            assert a == b and a[0] == 535
            assert with_password > LEGACY_FAILURE_FLOOR + 0.3  # the queue was there to be seen
            assert abs(with_password - without) < 0.5, (with_password, without)
            assert {answer[0] for answer in await asyncio.gather(*load)} == {535}
        finally:
            for client in (*loaders, *probes):
                client.close()


# ----------------------------------------------------------------- both engines


@pytest.fixture(scope="module")
def sha512() -> str:
    return dovecot_hash("SHA512-CRYPT", RIGHT)


async def test_the_login_sql_answers_alike_on_both_engines(keystore_place, sha512):
    """_LEGACY_SQL, _judge and the conversion's retirement (flush_uses) on sqlite and
    PostgreSQL: one 535 for a wrong password, an unknown mailbox and a mailbox with no
    password; the retired-password reply only for the right password; an open session
    of the password ends once its replacement key has been used."""
    store = await keystore_place.open()
    try:
        await store.add_mailbox("keyonly@example.com", workspace="w", actor="t")
        entries, bad = read_dovecot_passwd(f"user@example.com:{sha512}\nother@example.com:{sha512}\n")
        assert not bad
        await store.import_legacy(entries, source="passwd", actor="t", workspace="w")
        ip = "192.0.2.7"

        session = await store.authenticate("User@Example.COM", RIGHT, ip)
        assert isinstance(session, Identity) and session.legacy and session.mailbox == "user@example.com"
        for username, password in [("user@example.com", "wrong"), ("nobody@example.com", RIGHT),
                                   ("keyonly@example.com", RIGHT), ("user@example.com", ""),
                                   ("not an address", RIGHT)]:
            assert await store.authenticate(username, password, ip) is Reason.BAD_CREDENTIALS, username

        _, key, secret = await store.convert_legacy("user@example.com", actor="t")
        # converted, not yet used: the password still works, and so does the session
        assert isinstance(await store.authenticate("user@example.com", RIGHT, ip), Identity)
        assert isinstance(await store.recheck(session), Identity)
        used = await store.authenticate("user@example.com", secret, ip)
        assert isinstance(used, Identity) and not used.legacy and used.key_id == key.id
        await store.flush_uses()
        assert await store.authenticate("user@example.com", RIGHT, ip) is Reason.PASSWORD_RETIRED
        assert await store.authenticate("user@example.com", "wrong", ip) is Reason.BAD_CREDENTIALS
        assert await store.recheck(session) is Reason.PASSWORD_RETIRED
        # the other mailbox's password is untouched
        assert isinstance(await store.authenticate("other@example.com", RIGHT, ip), Identity)
    finally:
        await store.close()
