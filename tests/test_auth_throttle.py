"""The AUTH throttle as a sprayer, a brute-forcer and a shared egress address meet it:
wrong secrets are counted per (address, username) and per address, reserved before the
keystore is asked; a right secret on an unusable key only counts against that key."""

from __future__ import annotations

import asyncio
import base64

import aiosmtplib
import pytest

from keystore import keys
from relay.auth import FailureLimiter
from relay.config import ConfigError, load_config
from tests.support.relayrun import write_config

BLOCKED = "4.7.0 Too many failed authentication attempts from your address, try later"


class CheckCounter:
    """Counts the secret checks the relay's own KeyStore makes (the real store, counted)."""

    def __init__(self, store) -> None:
        self.count = 0
        original = store.authenticate

        async def counted(*args, **kwargs):
            self.count += 1
            return await original(*args, **kwargs)

        store.authenticate = counted


async def auth_plain(h, username: str, secret: str, *, client=None) -> tuple[int, str]:
    """One AUTH PLAIN on a fresh connection (unless given one): (code, text)."""
    own = client is None
    client = client or await h.client()
    token = base64.b64encode(f"\0{username}\0{secret}".encode())
    try:
        code, message = await client.execute_command(b"AUTH", b"PLAIN", token)
    except aiosmtplib.SMTPServerDisconnected:
        code, message = 0, "disconnected"
    if own:
        client.close()
    return code, message


def wrong_secret_for(key: str) -> str:
    """A well-formed key with the right id and a wrong secret: it reaches the keystore."""
    return keys.format_key(keys.parse_key(key).key_id, keys.generate_secret())


async def test_concurrent_wrong_auths_make_no_more_keystore_checks_than_the_budget(relay_with):
    async with relay_with(auth="max_failures = 5") as h:
        await h.mailbox("alice@example.com")
        await h.mailbox("bob@example.com")
        wrong = wrong_secret_for(await h.key("alice@example.com"))
        bob = await h.key("bob@example.com")
        checks = CheckCounter(h.relay.store)
        clients = [await h.client() for _ in range(25)]
        results = await asyncio.gather(
            *(auth_plain(h, "alice@example.com", wrong, client=c) for c in clients))
        for client in clients:
            client.close()
        assert checks.count == 5
        assert sorted(code for code, _ in results) == [421] * 20 + [535] * 5
        assert {message for code, message in results if code == 421} == {BLOCKED}
        # the address as a whole is far from its ceiling: another mailbox logs in
        assert (await auth_plain(h, "bob@example.com", bob))[0] == 235


async def test_a_right_secret_on_a_revoked_key_counts_only_against_that_key(relay_with):
    """A CRM's egress address: one customer's stale (revoked) key retried over and over
    must not lock out the other customers, nor the same mailbox's current key."""
    async with relay_with(auth="max_failures = 3") as h:
        await h.mailbox("alice@example.com")
        await h.mailbox("bob@example.com")
        record, stale = await h.relay.store.create_key(mailbox="alice@example.com", name="old", actor="t")
        await h.relay.store.revoke_key(record.id, actor="t")
        alice, bob = await h.key("alice@example.com"), await h.key("bob@example.com")
        checks = CheckCounter(h.relay.store)

        replies = [await auth_plain(h, "alice@example.com", stale) for _ in range(11)]
        assert [code for code, _ in replies] == [535] * 3 + [421] * 8
        assert all("this auth key has been revoked" in message for _, message in replies[:3])
        assert checks.count == 3  # the stale key stopped reaching the keystore

        assert (await auth_plain(h, "bob@example.com", bob))[0] == 235
        assert (await auth_plain(h, "alice@example.com", alice))[0] == 235
        # and wrong secrets still have their whole budget
        wrong = wrong_secret_for(bob)
        codes = [(await auth_plain(h, "bob@example.com", wrong))[0] for _ in range(4)]
        assert codes == [535, 535, 535, 421]


async def test_an_address_over_its_ceiling_still_lets_a_valid_key_of_another_mailbox_in(relay_with):
    async with relay_with(auth="max_failures = 2\nmax_failures_per_address = 4") as h:
        await h.mailbox("bob@example.com")
        bob = await h.key("bob@example.com")
        checks = CheckCounter(h.relay.store)
        for n in range(4):  # four stale usernames behind one address: the ceiling
            assert (await auth_plain(h, f"customer{n}@example.com", wrong_secret_for(bob)))[0] == 535
        assert checks.count == 4

        # a username that has failed here is refused without asking the keystore
        assert await auth_plain(h, "customer0@example.com", bob) == (421, BLOCKED)
        assert checks.count == 4
        # a valid key of another mailbox still logs in
        assert (await auth_plain(h, "bob@example.com", bob))[0] == 235
        # a username new here gets one check, then it is refused like the others
        assert (await auth_plain(h, "carol@example.com", wrong_secret_for(bob)))[0] == 535
        assert await auth_plain(h, "carol@example.com", wrong_secret_for(bob)) == (421, BLOCKED)
        assert checks.count == 6


async def test_a_blocked_username_does_not_say_whether_it_exists(relay_with):
    async with relay_with(auth="max_failures = 2") as h:
        await h.mailbox("alice@example.com")
        key = await h.key("alice@example.com")
        seen = {}
        for username in ("alice@example.com", "nobody@example.com"):
            seen[username] = [await auth_plain(h, username, wrong_secret_for(key)) for _ in range(3)]
        assert seen["alice@example.com"] == seen["nobody@example.com"]
        assert seen["alice@example.com"][-1] == (421, BLOCKED)


async def test_concurrent_logins_with_the_right_key_are_not_held_back(relay_with):
    """Reservations are given back by a success: a burst of good logins never blocks."""
    async with relay_with(auth="max_failures = 2") as h:
        await h.mailbox("alice@example.com")
        key = await h.key("alice@example.com")
        clients = [await h.client() for _ in range(10)]
        results = await asyncio.gather(*(auth_plain(h, "alice@example.com", key, client=c) for c in clients))
        for client in clients:
            client.close()
        assert [code for code, _ in results] == [235] * 10


async def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4():
    """(Loopback has one IPv6 address, so the counting itself is what is tested here.)"""
    limiter = FailureLimiter(2, 60)
    for ip in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:9"):  # two hosts of one /64
        (await limiter.reserve(ip, "alice@example.com")).failed()
    assert await limiter.reserve("2001:db8:1:2::77", "alice@example.com") is None
    assert await limiter.reserve("2001:db8:1:3::1", "alice@example.com") is not None  # next /64
    (await limiter.reserve("192.0.2.1", "bob@example.com")).failed()
    (await limiter.reserve("::ffff:192.0.2.1", "bob@example.com")).failed()
    assert await limiter.reserve("192.0.2.1", "bob@example.com") is None


async def test_usernames_count_in_their_canonical_form():
    limiter = FailureLimiter(2, 60)
    (await limiter.reserve("192.0.2.1", "Alice@Example.com")).failed()
    (await limiter.reserve("192.0.2.1", " alice@example.com. ")).failed()
    assert await limiter.reserve("192.0.2.1", "alice@example.com") is None


@pytest.mark.parametrize(("auth", "complaint"), [
    ("max_failures = 0", "[auth] max_failures: at least 1"),
    ("max_failures = 10\nmax_failures_per_address = 5", "[auth] max_failures_per_address: at least"),
    ("max_failures_per_address = 0", "[auth] max_failures_per_address: at least"),
])
def test_a_throttle_cannot_be_turned_off_by_a_zero(tmp_path, auth, complaint):
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, 2525, auth=auth))
    assert complaint in str(refused.value)


def test_the_address_ceiling_defaults_to_ten_budgets(tmp_path):
    config = load_config(write_config(tmp_path, 2525, auth="max_failures = 3"))
    assert config.auth.address_ceiling == 30


async def test_successful_logins_leave_nothing_behind():
    limiter = FailureLimiter(3, 60)
    for n in range(1000):
        (await limiter.reserve(f"192.0.2.{n % 250}", f"user{n}@example.com", "abcdefghijkl")).release()
    assert len(limiter) == 0
