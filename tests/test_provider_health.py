"""Provider health through the real relay: a smarthost that keeps failing its sessions is
marked down and skipped, probed once its backoff ends, and marked up when the probe gets
through; a route with every upstream down defers without connecting and without spinning."""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING

import pytest

from tests.support.procs import free_port
from tests.support.relayrun import write_secret
from tests.support.servers import RawServer
from tests.support.sink import Sink
from tests.support.waiting import wait_until
from tests.test_delivery import MESSAGE, provider_tls
from tests.test_queue_integrity import provider_extra

if TYPE_CHECKING:
    from relay.delivery.health import ProviderState

GREETING_421 = b"421 4.3.2 service not available, closing channel"


def smarthost(name: str, port: int, timeout: str = "5s") -> str:
    return (f'\n[[upstream]]\nname = "{name}"\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\n'
            f'timeout = "{timeout}"\n')


def group(name: str, *members: str) -> str:
    listed = ", ".join(f'"{m}"' for m in members)
    return f'\n[[group]]\nname = "{name}"\nmembers = [{listed}]\nstrategy = "failover"\n'


def health(down_after: int, backoff: str, max_backoff: str | None = None) -> str:
    return f'down_after = {down_after}\nbackoff = "{backoff}"\nmax_backoff = "{max_backoff or backoff}"'


def state_of(h, name: str) -> ProviderState:
    return next(s for s in h.relay.health.snapshot() if s.name == name)


def tried(caplog, upstream: str) -> int:
    """Mail log lines of deliveries tried through `upstream` (one per recipient and attempt)."""
    return sum(1 for r in caplog.records
               if getattr(r, "event", None) in ("sent", "deferred", "bounced")
               and f" upstream={upstream} " in r.getMessage())


def lines(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "relay.mail" and r.getMessage().startswith(start)]


async def send_many(h, secret: str, count: int) -> None:
    client = await h.login("alice@example.com", secret)
    for _ in range(count):
        await client.sendmail("alice@example.com", ["bob@example.net"], MESSAGE)
    await client.quit()


@pytest.mark.parametrize("failure", ["closed port", "421 greeting"])
async def test_a_failing_provider_is_skipped_then_probed_back_into_the_group(relay_with, caplog, failure):
    caplog.set_level(logging.INFO, logger="relay")
    refusing = RawServer(GREETING_421)
    if failure == "closed port":
        port = free_port()  # nothing listens: connection refused
    else:
        await refusing.__aenter__()
        port = refusing.port
    back = Sink()
    extra = smarthost("first", port) + group("main", "first", "sink")
    try:
        async with relay_with(upstream_extra=extra, retry='["1h"]', health=health(2, "2s")) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="main")

            # K = 2 attempts, each refused by `first` and delivered through the sink at once
            for n in (1, 2):
                await send_many(h, secret, 1)
                await h.sink.wait_for(n)
            assert tried(caplog, "first") == 2
            assert refusing.connections == (2 if failure == "421 greeting" else 0)
            (line,) = lines(caplog, "provider_down ")
            assert line.startswith("provider_down upstream=first failures=2 backoff=2.000 reply=")
            expected = "refused greeting: 421 4.3.2" if failure == "421 greeting" else "Connection refused"
            assert expected in line
            down = state_of(h, "first")
            assert (down.up, down.failures, down.downs) == (False, 2, 1)
            assert down.last_error.startswith("451 4.4") and expected in down.last_error

            # while it is down, the group goes to the sink without trying `first` at all
            await send_many(h, secret, 5)
            await h.sink.wait_for(7)
            assert tried(caplog, "first") == 2
            assert time.time() < down.down_until, "the backoff ran out during the test: too slow a machine"
            assert refusing.connections == (2 if failure == "421 greeting" else 0)

            # the provider comes back on its port; the first delivery after the backoff
            # probes it, gets through, and marks it up
            if failure == "421 greeting":
                await refusing.__aexit__(None, None, None)
            await back.start_on(port)
            await wait_until(lambda: time.time() > down.down_until, timeout=5, what="the end of the backoff")
            await send_many(h, secret, 1)
            (probe,) = await back.wait_for(1)
            assert probe.rcpt_tos == ["bob@example.net"]
            up = state_of(h, "first")
            assert (up.up, up.failures, up.down_until) == (True, 0, None)
            (line,) = lines(caplog, "provider_up ")
            assert line.startswith("provider_up upstream=first down_for=")
            await send_many(h, secret, 1)  # and mail goes to it again, first in the group
            await back.wait_for(2)
            assert len(h.sink.messages) == 7
    finally:
        await back.stop()
        if refusing.server is not None and refusing.server.is_serving():
            await refusing.__aexit__(None, None, None)


async def test_one_probe_at_a_time_and_the_backoff_doubles_while_probes_fail(relay_with, caplog):
    caplog.set_level(logging.INFO, logger="relay")
    async with RawServer(None) as hung:  # accepts, never greets: each session times out (1 s)
        extra = smarthost("first", hung.port, timeout="1s") + group("main", "first", "sink")
        async with relay_with(upstream_extra=extra, retry='["1h"]', health=health(1, "0.3s", "10s")) as h:
            await h.mailbox("alice@example.com")
            secret = await h.key("alice@example.com", route="main")
            await send_many(h, secret, 1)
            await h.sink.wait_for(1)  # after `first` timed out: it is down for 0.3 s
            down = state_of(h, "first")
            await wait_until(lambda: time.time() > down.down_until, what="the end of the backoff")
            # five deliveries once the backoff is over: one is the probe (and hangs on
            # `first`), the other four skip it and reach the sink at once
            await send_many(h, secret, 5)
            await h.sink.wait_for(5)
            assert hung.connections == 2
            (line,) = lines(caplog, "provider_down ")
            assert line.startswith("provider_down upstream=first failures=1 backoff=0.300 reply=")
            # the probe times out, its message fails over, and the backoff doubles
            await h.sink.wait_for(6)
            (line,) = lines(caplog, "provider_probe_failed ")
            assert line.startswith("provider_probe_failed upstream=first failures=2 backoff=0.600 reply=")
            assert "first timed out" in line
            assert hung.connections == 2
            probed = state_of(h, "first")
            assert (probed.up, probed.failures, probed.backoff, probed.probing) == (False, 2, 0.6, False)


async def queue_rows(h) -> list:
    return await h.relay.queue.store.messages()


async def test_a_route_whose_upstreams_are_all_down_defers_without_connecting_or_spinning(relay_with):
    async with RawServer(GREETING_421) as a, RawServer(b"554 5.3.2 not accepting mail") as b:
        extra = smarthost("a", a.port) + smarthost("b", b.port) + group("both", "a", "b")
        async with relay_with(upstream_extra=extra, retry='["0.2s"]', health=health(1, "30s")) as h:
            await h.mailbox("alice@example.com")
            await send_many(h, await h.key("alice@example.com", route="both"), 1)
            # the first attempt tries both (each refuses its greeting); from then on the
            # route is down and the attempts make no connection
            down = re.compile(r"^451 4\.4\.1 all upstreams of route both are down \(next probe in \d+s\)$")
            rows: list = []

            async def deferred_down() -> bool:
                rows[:] = await queue_rows(h)
                return len(rows) == 1 and bool(down.match(rows[0].last_error or ""))

            await wait_until(deferred_down, what="the all-down deferral")
            assert (a.connections, b.connections) == (1, 1)
            assert rows[0].recipients[0].status == "pending"

            # attempts go on at the retry schedule's pace (0.2 s), not faster, not stopping
            start, first = time.monotonic(), rows[0].attempts

            async def three_more() -> bool:
                return await deferred_down() and rows[0].attempts >= first + 3

            await wait_until(three_more, what="three more attempts")
            elapsed = time.monotonic() - start
            assert elapsed >= 2 * 0.2, f"3 attempts in {elapsed:.2f}s: faster than the retry schedule"
            assert (a.connections, b.connections) == (1, 1)

            # a route of one upstream that is down says so the same way
            await send_many(h, await h.key("alice@example.com", route="a", name="a only"), 1)

            async def single_down() -> bool:
                return any((r.last_error or "").startswith("451 4.4.1 upstream a is down (next probe in ")
                           for r in await queue_rows(h))

            await wait_until(single_down, what="the single upstream's deferral")
            assert (a.connections, b.connections) == (1, 1)
            assert h.sink.messages == []


async def test_a_refused_sender_is_not_the_providers_failure_but_a_refused_login_is(relay_with, tmp_path):
    write_secret(tmp_path / "provider-password", "s3cret\n")
    tls = provider_tls(tmp_path)
    async with (Sink(tls=tls, credentials=("relay", "s3cret")) as picky,
                Sink(tls=tls, credentials=("relay", "changed")) as locked):
        picky.handler.mail_reply = "550 5.7.1 sender address not verified"
        extra = provider_extra(picky.port, "picky") + provider_extra(locked.port, "locked")
        async with relay_with(upstream_extra=extra, retry='["1h"]', health=health(1, "30s")) as h:
            await h.mailbox("alice@example.com")
            locked_key = await h.key("alice@example.com", route="locked", name="locked")
            await send_many(h, locked_key, 1)

            async def replies(count: int) -> list[str] | None:
                rows = await queue_rows(h)
                return [r.last_error or "" for r in rows] if len(rows) == count and all(
                    r.attempts for r in rows) else None

            await wait_until(lambda: replies(1), what="the refused login")
            # one refused login (down_after = 1) and the provider is down: no more connections
            await send_many(h, locked_key, 1)
            await wait_until(lambda: replies(2), what="the next message to the locked provider")
            assert (await replies(2))[1].startswith("451 4.4.1 upstream locked is down (next probe in ")
            assert locked.handler.connections == 1
            # a provider refusing the sender keeps being used: the session itself worked
            await send_many(h, await h.key("alice@example.com", route="picky"), 2)
            await wait_until(lambda: replies(4), what="both messages to the picky provider")
            refusals = [r.split(": ")[0] for r in (await replies(4))[2:]]
            assert refusals == ["451 4.4.0 picky refused MAIL FROM"] * 2
            picky_state, locked_state = state_of(h, "picky"), state_of(h, "locked")
            # two sessions that worked up to a sender refusal: the provider is fine
            assert (picky_state.up, picky_state.failures) == (True, 0)
            assert (locked_state.up, locked_state.failures) == (False, 1)
            assert "refused AUTH: 535" in locked_state.last_error


async def test_health_survives_a_reload_for_upstreams_still_configured(relay_with):
    async with RawServer(GREETING_421) as refusing:
        extra = smarthost("first", refusing.port) + group("main", "first", "sink")
        async with relay_with(upstream_extra=extra, retry='["1h"]', health=health(1, "30s")) as h:
            await h.mailbox("alice@example.com")
            await send_many(h, await h.key("alice@example.com", route="main"), 1)
            await h.sink.wait_for(1)
            # the reloaded config adds an upstream; deliveries through the group still skip
            # `first`, which is still down, and the new one starts up
            text = h.config_path.read_text()
            spare = smarthost("spare", refusing.port)
            h.config_path.write_text(text.replace("\n[[group]]", spare + "\n[[group]]"))
            assert await h.relay.reload()
            await send_many(h, await h.key("alice@example.com", route="main", name="again"), 1)
            await h.sink.wait_for(2)
            assert refusing.connections == 1
            assert [(s.name, s.up) for s in h.relay.health.snapshot()] == [
                ("sink", True), ("first", False), ("spare", True)]
