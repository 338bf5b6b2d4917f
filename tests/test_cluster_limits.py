"""Send rates and the AUTH throttle shared by several relays through one real PostgreSQL
(issue 12): a key limited to N messages a minute gets N in total, whichever nodes its
messages reach and however many arrive at once; a username out of failed logins at one
node is refused at the others. Each "node" here is what a relay builds at start
(relay.app.open_cluster_limits): its own pool on the keystore's database.

When the database is gone or stops answering, a send rate that cannot be checked refuses
the message with a 4xx (never lets it through unlimited, never a 5xx), and the throttle
goes by each node's own counts. Last, two real relays on one PostgreSQL keystore
(tests/support/cluster.py) and Python's smtplib as the client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import time
from collections.abc import AsyncIterator

import aiosmtplib
import pytest

from keystore.clusterlimits import LimitsUnavailable
from keystore.pglimits import PgLimits
from keystore.store import KeyStore
from relay import replies
from relay.auth import Authenticator, FailureLimiter
from tests.support.cluster import running_cluster
from tests.support.waiting import wait_until

ALICE, BOB = "alice@example.com", "bob@example.com"
CLIENT = "192.0.2.7"


@contextlib.asynccontextmanager
async def nodes(url: str, count: int = 2, *, per_minute: int = 5, **options) -> AsyncIterator[list[PgLimits]]:
    opened = [await PgLimits.open(url, per_minute=per_minute, **options) for _ in range(count)]
    try:
        yield opened
    finally:
        for limits in opened:
            await limits.close()


# ------------------------------------------------------------------ send rates


async def test_a_key_gets_its_rate_once_across_two_nodes(pg_url):
    async with nodes(pg_url, per_minute=5) as (a, b):
        at_a = [await a.rates.allow("key1") for _ in range(3)]
        at_b = [await b.rates.allow("key1") for _ in range(3)]
        assert at_a + at_b == [True] * 5 + [False]
        assert not await a.rates.allow("key1")
        # other keys have their own buckets, the key's own rate wins over the default
        assert [await b.rates.allow("key2", 2) for _ in range(3)] == [True, True, False]
        assert all([await a.rates.allow("key3", 0) for _ in range(20)])  # 0: no limit


async def test_n_messages_at_once_from_both_nodes_get_exactly_n(pg_url):
    async with nodes(pg_url, per_minute=10) as (a, b):
        results = await asyncio.gather(*(node.rates.allow("busy") for _ in range(15) for node in (a, b)))
        assert sum(results) == 10


async def test_the_bucket_refills_with_time(pg_url):
    """60 a minute is one a second once the minute's worth is spent."""
    async with nodes(pg_url, per_minute=60) as (a, b):
        assert sum(await asyncio.gather(*(a.rates.allow("k") for _ in range(61)))) == 60
        refused_at = time.monotonic()
        await wait_until(lambda: b.rates.allow("k"), 5, "a token refilled")
        assert time.monotonic() - refused_at > 0.5  # about a second, not at once
        assert not await a.rates.allow("k")


async def test_a_reload_changes_the_default_rate_and_the_buckets_carry_on(pg_url):
    async with nodes(pg_url, per_minute=5) as (a, b):
        assert [await a.rates.allow("k") for _ in range(2)] == [True, True]  # 3 left
        a.rates.per_minute = b.rates.per_minute = 2  # what RelayHandler.reconfigure does
        # what is left is capped at the new rate, and never refilled by the change
        assert [await b.rates.allow("k") for _ in range(3)] == [True, True, False]


async def test_idle_buckets_and_old_failures_are_pruned(pg_url, postgres_server):
    db = pg_url.rsplit("/", 1)[1]
    async with nodes(pg_url, 1, per_minute=2) as (a,):
        assert await a.rates.allow("idle") and await a.rates.allow("idle")
        assert await a.rates.allow("busy")
        limiter = FailureLimiter(3, 0.2, ledger=a.ledger)
        (await limiter.reserve(CLIENT, ALICE)).failed()
        await limiter.flush(5)
        postgres_server.psql(  # "idle" was last used two minutes ago: its bucket is full again
            "UPDATE keyrelay_send_rate SET stamp = stamp - interval '2 minutes' WHERE key_id = 'idle'", db)

        async def failure_pruned() -> bool:  # once it has left its 0.2 s window
            await a.prune()
            return postgres_server.psql("SELECT count(*) FROM keyrelay_auth_failure", db) == "0"

        await wait_until(failure_pruned, 5, "the old failure pruned")
        assert postgres_server.psql("SELECT key_id FROM keyrelay_send_rate", db) == "busy"
        assert [await a.rates.allow("idle") for _ in range(3)] == [True, True, False]


# ------------------------------------------------------------------ AUTH throttle


@contextlib.asynccontextmanager
async def authenticators(tmp_path, limits: list[PgLimits | None], *, max_failures: int = 3):
    """One keystore with alice and bob, and an Authenticator per node (the relay's own
    class) whose throttle uses that node's ledger (None: none)."""
    store = await KeyStore.open(tmp_path / "keystore.db", tmp_path / "pepper", create=True)
    try:
        secrets = {}
        for mailbox in (ALICE, BOB):
            await store.add_mailbox(mailbox, workspace="w", actor="t")
            secrets[mailbox] = (await store.create_key(mailbox=mailbox, name="crm", actor="t"))[1]
        made = [Authenticator(store, FailureLimiter(max_failures, 60, ledger=node and node.ledger),
                              recheck_interval=60) for node in limits]
        yield made, secrets
    finally:
        await store.close()


async def test_failures_at_one_node_use_up_the_budget_at_the_other(pg_url, tmp_path):
    async with nodes(pg_url) as (a, b), authenticators(tmp_path, [a, b]) as ((at_a, at_b), secrets):
        for _ in range(2):
            assert (await at_a.login(ALICE, "rak_wrong", CLIENT)).reply == replies.AUTH_INVALID
        assert (await at_b.login(ALICE, "rak_wrong", CLIENT)).reply == replies.AUTH_INVALID
        for node in (at_b, at_a):  # three failures in all: the right key is refused unasked
            refused = await node.login(ALICE, secrets[ALICE], CLIENT)
            assert (refused.identity, refused.reply, refused.close) == (None, replies.AUTH_TOO_MANY, True)
        # another mailbox behind the same address, and alice from elsewhere, carry on
        assert (await at_b.login(BOB, secrets[BOB], CLIENT)).reply == replies.AUTH_OK
        assert (await at_b.login(ALICE, secrets[ALICE], "198.51.100.1")).reply == replies.AUTH_OK


async def test_a_revoked_keys_retries_count_against_it_on_every_node(pg_url, tmp_path):
    async with nodes(pg_url) as (a, b), authenticators(tmp_path, [a, b]) as ((at_a, at_b), secrets):
        store = at_a._store
        (record, stale), = [await store.create_key(mailbox=ALICE, name="old", actor="t")]
        await store.revoke_key(record.id, actor="t")
        for node in (at_a, at_b, at_a):
            assert "revoked" in (await node.login(ALICE, stale, CLIENT)).reply
        assert (await at_b.login(ALICE, stale, CLIENT)).reply == replies.AUTH_TOO_MANY
        assert (await at_b.login(ALICE, secrets[ALICE], CLIENT)).reply == replies.AUTH_OK  # the current key


async def test_the_address_ceiling_is_the_clusters(pg_url):
    """A sprayer spreading usernames over the nodes meets one ceiling: past it, a username
    that failed at either node is refused at both."""
    async with nodes(pg_url) as (a, b):
        at_a = FailureLimiter(5, 60, max_failures_per_address=4, ledger=a.ledger)
        at_b = FailureLimiter(5, 60, max_failures_per_address=4, ledger=b.ledger)
        for n, limiter in enumerate((at_a, at_b, at_a, at_b)):
            (await limiter.reserve(CLIENT, f"user{n}@example.com")).failed()
            await limiter.flush(5)
        assert await at_b.reserve(CLIENT, "user0@example.com") is None  # failed at a, refused at b
        assert await at_a.reserve(CLIENT, "fresh@example.com") is not None  # one check, slowly


# ------------------------------------------------------------------ the database gone


class Forwarder:
    """A TCP hop between the nodes and PostgreSQL that can stop passing anything on while
    keeping every connection open: a database that does not answer (a partition)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pairs: set[asyncio.Task] = set()

    async def __aenter__(self) -> Forwarder:
        self.server = await asyncio.start_server(self._pair, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        self.open.set()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._pairs, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._pairs.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


def cut_off(postgres_server, url: str) -> None:
    """The database refuses new connections and drops the ones it has (as when it stops)."""
    db = url.rsplit("/", 1)[1]
    postgres_server.psql(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
    postgres_server.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")


async def test_a_rate_that_cannot_be_checked_refuses_the_message_for_now(relay_with, pg_url, postgres_server,
                                                                         caplog):
    caplog.set_level(logging.WARNING, logger="keystore.limits")
    async with relay_with(server="rate_per_minute = 2") as h, nodes(pg_url, 1, per_minute=2) as (limits,):
        # the relay's handler with the cluster's rates, as a relay on a PostgreSQL keystore has
        h.relay._handler._rates = limits.rates
        await h.mailbox(ALICE)
        client = await h.login(ALICE, await h.key(ALICE))
        assert (await client.mail(ALICE))[0] == 250
        await client.rset()
        cut_off(postgres_server, pg_url)
        for _ in range(2):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await client.mail(ALICE)
            assert f"{refused.value.code} {refused.value.message}" == replies.RATE_UNAVAILABLE
        assert replies.RATE_UNAVAILABLE.startswith("451 4.3.0 ")
        assert h.sink.messages == []
        await client.quit()
        said = [r.getMessage() for r in caplog.records if r.name == "keystore.limits"]
        assert len(said) == 1 and said[0].startswith("send rates cannot be checked"), said


async def test_a_database_that_does_not_answer_is_a_refusal_in_time_not_a_hang(pg_url, postgres_server):
    async with Forwarder(postgres_server.port) as hop:
        url = pg_url.replace(f":{postgres_server.port}/", f":{hop.port}/")
        async with nodes(url, 1, per_minute=5, timeout=0.5) as (a,):
            assert await a.rates.allow("k")
            hop.open.clear()
            started = time.monotonic()
            with pytest.raises(LimitsUnavailable, match="no answer in time"):
                await a.rates.allow("k")
            assert time.monotonic() - started < 2
            # and the next message is refused as fast (the stuck statement is not waited for)
            started = time.monotonic()
            with pytest.raises(LimitsUnavailable):
                await a.rates.allow("k")
            assert time.monotonic() - started < 2
            hop.open.set()


async def test_the_throttle_falls_back_to_each_nodes_own_counts_and_says_so_once(
        pg_url, postgres_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="keystore.throttle")
    async with nodes(pg_url, timeout=1) as (a, b), \
            authenticators(tmp_path, [a, b]) as ((at_a, at_b), secrets):
        assert (await at_a.login(ALICE, "rak_wrong", CLIENT)).reply == replies.AUTH_INVALID
        cut_off(postgres_server, pg_url)
        for _ in range(2):
            assert (await at_a.login(ALICE, "rak_wrong", CLIENT)).reply == replies.AUTH_INVALID
        # node a still holds its own budget: three failures counted there
        assert (await at_a.login(ALICE, secrets[ALICE], CLIENT)).reply == replies.AUTH_TOO_MANY
        # node b, which cannot read the cluster's counts now, goes by its own (none)
        assert (await at_b.login(ALICE, secrets[ALICE], CLIENT)).reply == replies.AUTH_OK
        warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(warnings) == 2, warnings  # once per node, not once per login
        assert all("this node counts its own failures alone" in w for w in warnings)
        assert not any(pg_url in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ two real relays


def smtplib_send(h, secret: str, subject: str) -> tuple[int, str]:
    """One message with Python's smtplib (STARTTLS, AUTH, MAIL, RCPT, DATA) through the
    relay `h`: (250, "") if accepted, else the refusal."""
    message = f"From: {ALICE}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", h.port, timeout=10) as client:
        client.starttls(context=h.tls)
        client.ehlo()
        client.esmtp_features["auth"] = "PLAIN"  # one AUTH per login (smtplib tries LOGIN after)
        try:
            client.login(ALICE, secret)
            client.sendmail(ALICE, ["bob@example.net"], message)
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        except smtplib.SMTPServerDisconnected:
            return 0, "disconnected"
    return 250, ""


async def test_two_relays_give_a_key_its_rate_once(tmp_path, sink, pg_url):
    async with running_cluster(tmp_path, sink, pg_url, server="rate_per_minute = 3") as (a, b):
        await a.mailbox(ALICE)
        secret = await a.key(ALICE)
        sent = [await asyncio.to_thread(smtplib_send, node, secret, f"m{n}")
                for n, node in enumerate((a, b, a, b, a))]
        limited = tuple(replies.RATE_LIMITED.split(" ", 1))
        assert sent == [(250, "")] * 3 + [(int(limited[0]), limited[1])] * 2
        delivered = await sink.wait_for(3)
        assert sorted(m.text.split("Subject: ")[1].split("\r\n")[0] for m in delivered) == ["m0", "m1", "m2"]


async def test_failed_logins_at_one_relay_shut_the_username_out_at_the_other(tmp_path, sink, pg_url):
    async with running_cluster(tmp_path, sink, pg_url, auth="max_failures = 3") as (a, b):
        await a.mailbox(ALICE)
        secret = await a.key(ALICE)
        wrong = secret[:-10] + "x" * 10
        for node in (a, b, a):
            code, text = await asyncio.to_thread(smtplib_send, node, wrong, "guess")
            assert f"{code} {text}" == replies.AUTH_INVALID
        for node in (b, a):
            code, text = await asyncio.to_thread(smtplib_send, node, secret, "after")
            assert f"{code} {text}" == replies.AUTH_TOO_MANY
        assert sink.messages == []


async def test_a_reload_applies_a_new_default_rate_to_the_shared_buckets(tmp_path, sink, pg_url):
    async with running_cluster(tmp_path, sink, pg_url, server="rate_per_minute = 5") as (a, b):
        await a.mailbox(ALICE)
        secret = await a.key(ALICE)
        assert await asyncio.to_thread(smtplib_send, b, secret, "m0") == (250, "")  # 4 left
        config = a.config_path.read_text()
        a.config_path.write_text(config.replace("rate_per_minute = 5", "rate_per_minute = 1"))
        assert await a.relay.reload()
        sent = [await asyncio.to_thread(smtplib_send, a, secret, f"m{n}") for n in (1, 2)]
        assert [code for code, _ in sent] == [250, 451]  # what was left is capped at the new rate
        await sink.wait_for(2)


async def test_the_ledger_names_no_username_anyone_with_the_database_could_recompute(
        tmp_path, sink, pg_url, postgres_server):
    """The shared failure counters are named by a digest of (kind, client network,
    username). Unkeyed, whoever reads the database (a backup, a replica) could test a list
    of usernames and addresses against it; keyed with a key derived from the pepper (the
    same on every node), the names say nothing without the pepper."""
    from keystore import keys
    from keystore.throttle import slot_digest

    async with running_cluster(tmp_path, sink, pg_url) as (a, b):
        await a.mailbox(ALICE)
        client = await b.client()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await client.login(ALICE, "rak_wrongwrongwrong_not-a-key")
        client.close()
        db = pg_url.rsplit("/", 1)[1]
        count = "SELECT count(*) FROM keyrelay_auth_failure"
        names = "SELECT encode(slot, 'hex') FROM keyrelay_auth_failure"
        await wait_until(lambda: postgres_server.psql(count, db) != "0", 5, "the failure in the ledger")
        stored = set(postgres_server.psql(names, db).split())
        slot = ("user", "127.0.0.1", ALICE)
        assert slot_digest(slot).hex() not in stored
        key = keys.ledger_key(keys.load_pepper(tmp_path / "a" / "pepper"))
        assert slot_digest(slot, key).hex() in stored
