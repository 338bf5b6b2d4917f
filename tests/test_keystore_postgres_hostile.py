"""A PostgreSQL keystore met by a hostile client and a careless admin (issue 12's review):
what each sees must be what a sqlite keystore shows them, and no output names a password.

Real PostgreSQL (the session's server, a database per test), the real relay and CLI.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiosmtplib
import psycopg
import pytest

from keystore import keys
from tests.conftest import running_relay
from tests.support.procs import keystore_cli
from tests.support.relayrun import write_config as relay_config
from tests.test_keystore_postgres import keystore_url_edit

POSTGRES_READ_TIMEOUT = 5.0  # keystore/postgresdb.py READ_TIMEOUT
SECRET = "pg-s3cret-word"  # the test server trusts loopback: a password in the URL goes unused


def check_config(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), "check-config"],
                          capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------ passwords


@pytest.mark.parametrize("place", ["password", "sslpassword"])
def test_a_password_in_the_query_string_is_never_shown(tmp_path, pg_url, place):
    """libpq reads `?password=` (and `sslpassword=`, a client key's passphrase) as well as
    `user:password@`: check-config and the keystore CLI name the URL without either."""
    url = f"{pg_url}?{place}={SECRET}"
    config = relay_config(tmp_path, 2525)
    config.write_text(keystore_url_edit(url)(config.read_text()))
    checked = check_config(config)
    assert "[keystore] url: postgresql://" in checked.stderr  # no tables yet: it names the URL
    assert SECRET not in checked.stdout + checked.stderr
    created = keystore_cli(config, "init")
    assert created.returncode == 0 and created.stdout.startswith("keystore postgresql://")
    assert SECRET not in created.stdout + created.stderr


@pytest.mark.parametrize("password", [f"{SECRET}%zz", f"{SECRET}/x"])
def test_a_url_libpq_cannot_read_is_refused_without_its_password(tmp_path, pg_url, password):
    """A password with a bad %-escape (libpq quotes the token it cannot decode) or an
    unescaped '/' (the rest reads as the database name): the admin is told the URL is
    wrong, with the password masked, by the CLI and by check-config."""
    scheme, rest = pg_url.split("://", 1)
    user, host = rest.split("@", 1)
    url = f"{scheme}://{user}:{password}@{host}"
    config = relay_config(tmp_path, 2525)
    config.write_text(keystore_url_edit(url)(config.read_text()))
    listed = keystore_cli(config, "init")
    assert listed.returncode == 1 and listed.stderr.startswith(f"keystore: {scheme}://{user}:***@")
    checked = check_config(config)
    assert "[keystore] url: cannot connect: postgresql://" in checked.stderr
    assert SECRET not in listed.stdout + listed.stderr + checked.stdout + checked.stderr


# ------------------------------------------------------------ hostile clients


async def test_a_nul_in_the_auth_login_username_is_a_wrong_credential(tmp_path, sink, pg_url):
    """AUTH LOGIN's username is any UTF-8, NUL included, which PostgreSQL's text cannot
    hold: the client gets 535 5.7.8 as on sqlite (not 454 4.7.0, a keystore outage any
    client could announce at will in the logs and metrics, uncounted by the throttle)."""
    async with running_relay(tmp_path, sink, edit=keystore_url_edit(pg_url)) as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        client = await h.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await client.auth_login("alice\x00@example.com", secret)
        assert (refused.value.code, refused.value.message[:5]) == (535, "5.7.8")
        await client.auth_login("alice@example.com", secret)  # the session goes on
        await client.quit()


# ------------------------------------------------------------ the pepper


async def test_a_node_with_another_pepper_is_refused(tmp_path, sink, pg_url):
    """Every node needs the keystore's pepper. One given another (a second `keystore init`
    racing the first, a file copied from the wrong place) would take every key for a wrong
    secret, and its refusals would fill the cluster's AUTH ledger: the key's holder shut
    out at every node. Such a node's relay and CLI are refused at once, and the pepper
    named; the keystore and the nodes with its pepper go on."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    config = relay_config(first, 2525)
    config.write_text(keystore_url_edit(pg_url)(config.read_text()))
    assert keystore_cli(config, "init").returncode == 0
    assert keystore_cli(config, "mailbox", "add", "alice@example.com").returncode == 0
    other = relay_config(second, 2525)
    other.write_text(keystore_url_edit(pg_url)(other.read_text()))
    keys.create_pepper(second / "pepper")

    listed = keystore_cli(other, "mailbox", "list")
    assert listed.returncode == 1
    assert listed.stderr.startswith(f"keystore: {second / 'pepper'}: not this keystore's pepper")
    checked = check_config(other)
    assert (f"problem: {other}: [keystore] pepper_file: {second / 'pepper'}: not this keystore's "
            "pepper") in checked.stderr
    assert "not this keystore's pepper" not in check_config(config).stderr
    with pytest.raises(keys.PepperError):
        async with running_relay(second, sink, edit=keystore_url_edit(pg_url)):
            pass
    listed = keystore_cli(config, "mailbox", "list")
    assert listed.returncode == 0 and "alice@example.com" in listed.stdout


# ------------------------------------------------------------ a stalled database


async def test_a_stalled_keystore_is_a_temporary_failure_not_a_hung_login(tmp_path, sink, pg_url):
    """The keystore's tables locked (a long migration, an admin's `LOCK TABLE`, a VACUUM
    FULL): AUTH answers 454 4.7.0 within the keystore's deadline, as a stopped server
    does, instead of hanging until the client gives up (an abandoned AUTH counts as a
    failed one: in the cluster's ledger, a correct key shut out at every node). Once the
    lock goes, the same key logs in."""
    async with running_relay(tmp_path, sink, edit=keystore_url_edit(pg_url),
                             auth="max_failures = 1") as h:
        await h.mailbox("alice@example.com")
        secret = await h.key("alice@example.com")
        holder = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
        try:
            await holder.execute("BEGIN")
            await holder.execute("LOCK TABLE mailbox IN ACCESS EXCLUSIVE MODE")
            for _ in range(2):  # more than [auth] max_failures: none of them counted
                client = await h.client()
                started = time.monotonic()
                with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                    await client.auth_plain("alice@example.com", secret, timeout=POSTGRES_READ_TIMEOUT + 10)
                assert (refused.value.code, refused.value.message[:5]) == (454, "4.7.0")
                assert time.monotonic() - started < POSTGRES_READ_TIMEOUT + 2
                client.close()
        finally:
            await holder.execute("ROLLBACK")
            await holder.close()
        client = await h.login("alice@example.com", secret)
        await client.quit()


# ------------------------------------------------------------ notifications


async def test_a_change_announced_during_a_login_is_not_cached_away(tmp_path):
    """A key revoked on another node while this node's AUTH is reading it: the login was
    decided before the revocation, but the verdict it caches must not carry the session's
    next messages through the whole recheck interval (the notification came and went
    while the login was in flight, so nothing else would end them)."""
    import asyncio

    from keystore.store import KeyStore
    from relay.auth import Authenticator, FailureLimiter

    store = await KeyStore.open(tmp_path / "k.db", tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        (key, secret) = await store.create_key(mailbox="a@acme.test", name="one", actor="t")
        auth = Authenticator(store, FailureLimiter(5, 60.0), recheck_interval=3600)
        read, revoked = asyncio.Event(), asyncio.Event()
        real_authenticate = store.authenticate

        async def held_authenticate(*args, **kwargs):
            verdict = await real_authenticate(*args, **kwargs)  # reads the key as still active
            read.set()
            await revoked.wait()  # the revoke and its notification land here
            return verdict

        store.authenticate = held_authenticate
        pending = asyncio.ensure_future(auth.login("a@acme.test", secret, "192.0.2.1"))
        await read.wait()
        await store.revoke_key(key.id, actor="t")
        auth.key_changed(f"key:{key.id}")
        revoked.set()
        identity = (await pending).identity
        assert identity is not None  # that read was taken before the revoke
        assert "revoked" in await auth.recheck(identity)  # the next MAIL FROM
    finally:
        await store.close()


async def test_what_was_cached_before_the_first_listen_is_forgotten(tmp_path, pg_url):
    """A relay opens its SMTP listeners, then starts listening for key changes (a database
    slow to answer makes that seconds): a session that logged in meanwhile, its key revoked
    on another node before this one listened, must not go on for the whole recheck
    interval on a verdict no notification will ever correct."""
    from keystore.opening import open_keystore
    from keystore.pgnotify import KeyChanges
    from relay.auth import Authenticator, FailureLimiter

    store = await open_keystore(url=pg_url, pepper_file=tmp_path / "pepper", create=True)
    changes = None
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        (key, secret) = await store.create_key(mailbox="a@acme.test", name="one", actor="t")
        auth = Authenticator(store, FailureLimiter(5, 60.0), recheck_interval=3600)
        identity = (await auth.login("a@acme.test", secret, "192.0.2.1")).identity
        assert identity is not None
        await store.revoke_key(key.id, actor="t")  # announced while nobody listens here
        changes = KeyChanges(pg_url, auth.key_changed)
        await changes.start()
        assert changes.listening
        assert "revoked" in await auth.recheck(identity)
    finally:
        if changes is not None:
            await changes.stop()
        await store.close()


# ------------------------------------------------------------ shared send rates


async def test_a_message_that_waited_for_the_bucket_does_not_turn_its_clock_back(pg_url):
    """A key's messages on several nodes queue for its bucket's row; each stamps the time
    it arrived. One that arrived first but got the row last (a stalled database serves
    waiters in any order) set the bucket's time back to its own, and the next message was
    refilled for that stretch a second time: more messages than the rate allows."""
    from keystore.pglimits import _SEND_ONE, PgLimits
    from tests.support.waiting import wait_until

    limits = await PgLimits.open(pg_url, per_minute=60, timeout=30)
    holder = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        assert await limits.rates.allow("k1")
        # the key has used its minute: an empty bucket, one token a second from now on
        await holder.execute("UPDATE keyrelay_send_rate SET tokens = 0, stamp = clock_timestamp()")
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM keyrelay_send_rate WHERE key_id = 'k1' FOR UPDATE")
        first = asyncio.ensure_future(limits.rates.allow("k1"))  # arrives first, waits for the row

        async def waiting() -> bool:
            cur = await probe.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND query LIKE '%keyrelay_send_rate%'")
            return (await cur.fetchone())[0] == 1

        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as probe:
            await wait_until(waiting, 10, "the first message waiting for the row")
        await holder.execute("SELECT pg_sleep(1.2)")
        # a message that arrived later gets the row first: 1.2 tokens came, it takes one
        cur = await holder.execute(_SEND_ONE, {"key": "k1", "rate": 60})
        assert (await cur.fetchone())[0] is True
        await holder.execute("COMMIT")
        assert await first is False  # 0.2 tokens left
        assert await limits.rates.allow("k1") is False  # still 0.2, not 1.4
    finally:
        await holder.close()
        await limits.close()


# ------------------------------------------------------------ careless input


async def test_input_postgresql_cannot_hold_is_refused_as_input_not_an_outage(tmp_path, pg_url):
    """A key limit past PostgreSQL's integer, a NUL in a search or a key id (the admin API
    passes what a token holder sends): the admin is told the input is wrong (the CLI's
    message, the API's 400), as on sqlite, not that the keystore is unavailable (the API's
    503 and a warning in the log, for a database that is fine)."""
    from keystore.opening import open_keystore
    from keystore.store import NotFound, StoreError

    store = await open_keystore(url=pg_url, pepper_file=tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        with pytest.raises(StoreError, match="a key limit is at most 2147483647"):
            await store.set_key_limit("acme", 2**31, actor="t")
        await store.set_key_limit("acme", 2**31 - 1, actor="t")
        with pytest.raises(StoreError, match="NUL"):
            await store.list_keys(search="night\x00ly")
        with pytest.raises(StoreError) as refused:
            await store.get_key("k\x00")
        assert not isinstance(refused.value, NotFound) and "NUL" in str(refused.value)
    finally:
        await store.close()


# ------------------------------------------------------------ a writer gone silent


async def test_a_writer_gone_silent_does_not_hold_every_revocation(tmp_path, pg_url, monkeypatch):
    """Every keystore write takes one lock for the whole cluster. An admin's command whose
    network dropped mid-transaction leaves its session idle in that transaction, which
    the server would keep (and the lock with it) until its TCP keepalive gives up, hours
    later: every revocation on every node would wait that long. The keystore's sessions
    are ended by the server after IDLE_TRANSACTION_TIMEOUT idle in a transaction (a
    second here, to keep the test short), and the revocation goes through."""
    from keystore import postgresdb
    from keystore.opening import open_keystore
    from keystore.store import KeystoreUnavailable

    monkeypatch.setattr(postgresdb, "IDLE_TRANSACTION_TIMEOUT", 1.0)
    pepper = tmp_path / "pepper"
    silent = await open_keystore(url=pg_url, pepper_file=pepper, create=True)
    other = await open_keystore(url=pg_url, pepper_file=pepper)
    try:
        await other.add_mailbox("a@acme.test", workspace="acme", actor="t")
        (key, _) = await other.create_key(mailbox="a@acme.test", name="one", actor="t")
        with pytest.raises(KeystoreUnavailable):
            async with silent._transaction():  # holds the write lock, then says nothing more
                revoked = await asyncio.wait_for(other.revoke_key(key.id, actor="t"), 15)
        assert revoked.status == "revoked"
    finally:
        await silent.close()
        await other.close()


# ------------------------------------------------------------ a restarted database


async def test_logins_after_the_database_dropped_every_pooled_connection_still_succeed(
        tmp_path, postgres_server, pg_url):
    """A database restart (or failover) breaks every pooled connection; each fails its next
    statement. A login's read is tried again on a fresh connection, so the restart costs
    the clients nothing (it was a 454 4.7.0 for up to a pool's worth of logins)."""
    from keystore.models import Identity
    from keystore.opening import open_keystore

    store = await open_keystore(url=pg_url, pepper_file=tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        _, secret = await store.create_key(mailbox="a@acme.test", name="crm", actor="t")
        # fill the pool: several logins at once each take a connection
        verdicts = await asyncio.gather(*(store.authenticate("a@acme.test", secret, "192.0.2.1")
                                          for _ in range(8)))
        assert all(isinstance(v, Identity) for v in verdicts)
        database = pg_url.rsplit("/", 1)[1]
        ended = postgres_server.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'keyrelay keystore'", database)
        assert int(ended) >= 2
        verdicts = await asyncio.gather(*(store.authenticate("a@acme.test", secret, "192.0.2.1")
                                          for _ in range(8)))
        assert all(isinstance(v, Identity) for v in verdicts), verdicts
    finally:
        await store.close()
