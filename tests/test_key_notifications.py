"""keystore/pgnotify.py against a real PostgreSQL: what the keystore NOTIFYs reaches the
relay at once, and a lost connection is made good (reconnect, then "forget everything")."""

from __future__ import annotations

from keystore.pgnotify import CHANNEL, EVERYTHING, KeyChanges
from tests.support.waiting import wait_until


async def test_changes_arrive_and_a_dropped_connection_is_made_good(postgres_server, pg_url):
    database = pg_url.rsplit("/", 1)[1]
    seen: list[str] = []
    listener = KeyChanges(pg_url, seen.append)
    await listener.start()
    try:
        assert listener.listening
        postgres_server.psql(f"NOTIFY {CHANNEL}, 'key:k1'", database)
        postgres_server.psql(f"NOTIFY {CHANNEL}, 'workspace:acme'", database)
        # the first LISTEN says "forget everything" too: nothing was heard before it
        await wait_until(lambda: seen == [EVERYTHING, "key:k1", "workspace:acme"], 5, "both notifications")
        seen.clear()

        # the server ends the listening connection: whatever was sent meanwhile is lost,
        # so once it listens again the relay is told to forget everything it cached
        postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'keyrelay notify'", database)
        await wait_until(lambda: EVERYTHING in seen, 10, "the catch-up after reconnecting")
        assert listener.listening
        postgres_server.psql(f"NOTIFY {CHANNEL}, 'key:k2'", database)
        await wait_until(lambda: seen[-1] == "key:k2", 5, "a notification after reconnecting")
    finally:
        await listener.stop()
    assert not listener.listening


async def test_a_server_that_is_not_there_does_not_stop_the_start(postgres_server):
    url = f"postgresql://{postgres_server.user}@127.0.0.1:1/none"
    listener = KeyChanges(url, lambda _: None)
    await listener.start(timeout=5)
    assert not listener.listening
    await listener.stop()


async def test_a_key_change_ends_the_cached_recheck_of_that_key_only(tmp_path):
    """With a long recheck interval, only the notification can make the change seen."""
    from keystore.store import KeyStore
    from relay.auth import Authenticator, FailureLimiter

    store = await KeyStore.open(tmp_path / "k.db", tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        (one, secret_one) = await store.create_key(mailbox="a@acme.test", name="one", actor="t")
        (two, secret_two) = await store.create_key(mailbox="a@acme.test", name="two", actor="t")
        auth = Authenticator(store, FailureLimiter(5, 60.0), recheck_interval=3600)
        first = (await auth.login("a@acme.test", secret_one, "192.0.2.1")).identity
        second = (await auth.login("a@acme.test", secret_two, "192.0.2.1")).identity
        await store.revoke_key(one.id, actor="t")
        await store.revoke_key(two.id, actor="t")
        assert await auth.recheck(first) == first  # cached: the change is not seen yet
        auth.key_changed(f"key:{one.id}")
        assert "revoked" in await auth.recheck(first)
        assert await auth.recheck(second) == second  # another key's cache stays
        auth.key_changed("workspace:acme")
        assert "revoked" in await auth.recheck(second)
    finally:
        await store.close()


async def test_a_change_announced_during_a_recheck_is_not_cached_away(tmp_path):
    """The notification can overtake a recheck already reading the old state: that read's
    verdict must not be kept for the whole interval."""
    import asyncio

    from keystore.store import KeyStore
    from relay.auth import Authenticator, FailureLimiter

    store = await KeyStore.open(tmp_path / "k.db", tmp_path / "pepper", create=True)
    try:
        await store.add_mailbox("a@acme.test", workspace="acme", actor="t")
        (key, secret) = await store.create_key(mailbox="a@acme.test", name="one", actor="t")
        auth = Authenticator(store, FailureLimiter(5, 60.0), recheck_interval=3600)
        identity = (await auth.login("a@acme.test", secret, "192.0.2.1")).identity
        reading, announced = asyncio.Event(), asyncio.Event()
        real_recheck = store.recheck

        async def slow_recheck(who):
            verdict = await real_recheck(who)  # reads the key as still active
            reading.set()
            await announced.wait()  # the revoke and its notification land here
            return verdict

        store.recheck = slow_recheck
        pending = asyncio.ensure_future(auth.recheck(identity, fresh=True))
        await reading.wait()
        await store.revoke_key(key.id, actor="t")
        auth.key_changed(f"key:{key.id}")
        announced.set()
        assert await pending == identity  # that read was taken before the revoke
        store.recheck = real_recheck
        assert "revoked" in await auth.recheck(identity)
    finally:
        await store.close()
