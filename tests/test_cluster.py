"""Two real relays on one real PostgreSQL keystore and queue (issue 12), as a team running
them behind a TCP load balancer would: what an admin does through either node reaches the
other's open sessions within a second, and a client sees one service."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib
import pytest

from tests.support.cluster import running_cluster
from tests.support.procs import keystore_cli
from tests.support.refusals import MESSAGE
from tests.support.waiting import wait_until

# A recheck cached for a minute: only the keystore's notification can end a session sooner.
SLOW_RECHECK = 'recheck_interval = "60s"'


async def mail_accepted(client: aiosmtplib.SMTP) -> None:
    await client.mail("alice@example.com")
    await client.rset()


@pytest.mark.parametrize("revoked_at", ["a", "b"])
async def test_a_key_revoked_through_either_nodes_cli_ends_the_others_open_session_within_a_second(
        tmp_path, sink, pg_url, revoked_at):
    async with running_cluster(tmp_path, sink, pg_url, auth=SLOW_RECHECK) as (a, b):
        await a.mailbox("alice@example.com")
        key_id_secret = await a.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="test")
        key, secret = key_id_secret
        at = {"a": a, "b": b}
        other = b if revoked_at == "a" else a
        client = await other.login("alice@example.com", secret)
        await mail_accepted(client)  # the session's recheck is cached now, for a minute
        bystander = await other.login("alice@example.com", (await a.relay.store.create_key(
            mailbox="alice@example.com", name="other tool", actor="test"))[1])
        await mail_accepted(bystander)

        done = await asyncio.to_thread(keystore_cli, at[revoked_at].config_path, "key", "revoke", key.id)
        assert done.returncode == 0, done.stderr
        revoked = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("alice@example.com")
        assert time.monotonic() - revoked < 1.0
        assert refused.value.code == 535 and "revoked" in refused.value.message
        await mail_accepted(bystander)  # another key's session goes on
        await bystander.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
        await bystander.quit()
        await wait_until(lambda: len(sink.messages) == 1, 10, "the bystander's message delivered")


async def test_suspending_a_workspace_through_one_node_ends_sessions_at_the_other(tmp_path, sink, pg_url):
    async with running_cluster(tmp_path, sink, pg_url, auth=SLOW_RECHECK) as (a, b):
        await a.mailbox("alice@example.com", workspace="acme")
        secret = await a.key("alice@example.com")
        client = await b.login("alice@example.com", secret)
        await mail_accepted(client)
        done = await asyncio.to_thread(keystore_cli, a.config_path, "workspace", "suspend", "acme",
                                       "--reason", "unpaid")
        assert done.returncode == 0, done.stderr
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.mail("alice@example.com")
        assert refused.value.code == 535 and "suspended" in refused.value.message


async def test_without_notifications_the_periodic_recheck_still_ends_the_session(
        tmp_path, sink, pg_url, postgres_server):
    """The safety net: node b's listening connection is cut and the revocation sent in that
    gap is lost; b's periodic recheck ([auth] recheck_interval) still ends the session."""
    async with running_cluster(tmp_path, sink, pg_url, auth='recheck_interval = "0.5s"') as (a, b):
        await a.mailbox("alice@example.com")
        key, secret = await a.relay.store.create_key(mailbox="alice@example.com", name="crm", actor="test")
        client = await b.login("alice@example.com", secret)
        await mail_accepted(client)
        database = pg_url.rsplit("/", 1)[1]
        # every node's listener: while they reconnect, nothing is heard
        postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'keyrelay notify'", database)
        await a.relay.store.revoke_key(key.id, actor="test")
        await wait_until(lambda: b.relay.key_changes.listening, 10, "node b listening again")

        async def refused() -> bool:
            try:
                await mail_accepted(client)
            except aiosmtplib.SMTPSenderRefused as exc:
                return exc.code == 535
            return False

        await wait_until(refused, 2.0, "node b to refuse the revoked key")
