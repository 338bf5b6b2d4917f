"""Authentication as the SMTP side sees it: SASL payloads, brute-force brakes, and turning
the keystore's verdict into the reply the client gets.

The keystore decides; this module only decides what to say and when to stop listening.
Unknown mailbox, unknown key and wrong secret are one reply (`535 5.7.8 Authentication
credentials invalid`): the keystore makes them cost the same, and nothing here branches
on which it was.

The throttle (FailureLimiter, in keystore/throttle.py: the admin API's token logins use
it too) counts within a sliding `failure_window`, per client address: an IPv4 address,
or an IPv6 /64 (one subscriber's prefix; its hosts pick any address in it at will). Three counters:

* wrong secrets per (address, username): `max_failures`, the small budget. Past it that
  username from that address gets `421 4.7.0`. Unknown mailboxes and wrong secrets count
  alike, so a blocked username says nothing about whether it exists.
* wrong secrets per address: `max_failures_per_address`, the ceiling. An address over it
  (a sprayer, or a shared egress address of a CRM with several stale customer keys) is
  not shut out: usernames that have failed from it are refused without asking the
  keystore, and a username that has not failed from it gets one check, answered slowly.
  So a valid key of another mailbox behind the same address still logs in, and a sprayer
  gets one guess per username at a slow pace (a 256-bit secret is not guessed that way).
* right secrets on unusable keys (revoked, disabled, expired, suspended, no email.send,
  not allowed from the client's address), per (address, key id): `max_failures` again.
  Only the key's holder can make these, so they never count against the address or the
  username.

Every count is reserved before the keystore is asked, and given back when the login
succeeds: any number of concurrent AUTHs make at most the budget's worth of checks. An
AUTH abandoned mid-check (the client went away) counts as failed.

With a PostgreSQL keystore the counted failures are the cluster's (the throttle's ledger,
keystore/pglimits.py): a username that used up its budget at one relay gets `421 4.7.0`
at every other. If the database cannot be asked, each relay goes by its own counts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from keystore import keys
from keystore.interface import AuthStore
from keystore.legacy import LegacyBusy
from keystore.models import Identity, Reason
from keystore.store import KeystoreUnavailable
from keystore.throttle import FAILURE_FLOOR, Attempt, FailureLimiter, client_network
from relay import maillog, replies
from relay.metrics import Metrics

__all__ = [
    "FAILURE_FLOOR", "Attempt", "Authenticator", "FailureLimiter", "LoginResult", "client_network",
    "split_plain",
]


def split_plain(blob: bytes) -> tuple[str, str, str] | None:
    """RFC 4616 PLAIN message → (authzid, authcid, passwd), or None if malformed."""
    parts = blob.split(b"\x00")
    if len(parts) != 3:
        return None
    try:
        authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        return None
    return authzid, authcid, passwd


@dataclass(frozen=True, slots=True)
class LoginResult:
    identity: Identity | None
    reply: str
    close: bool = False


class Authenticator:
    def __init__(self, store: AuthStore, limiter: FailureLimiter, *, recheck_interval: float,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._limiter = limiter
        self._recheck_interval = recheck_interval
        self._metrics = metrics or Metrics()
        self._checked: dict[tuple[str, str, bytes, str], tuple[float, Identity | Reason]] = {}
        self._changes = 0  # key changes announced so far (key_changed)

    def set_limits(self, *, max_failures: int, address_ceiling: int, window: float,
                   recheck_interval: float) -> None:
        """A reload: new budgets apply to the next check; failures already counted stay."""
        self._limiter.max_failures = max_failures
        self._limiter.address_ceiling = address_ceiling
        self._limiter.window = window
        self._recheck_interval = recheck_interval

    async def login(self, username: str, secret: str, client_ip: str) -> LoginResult:
        started = time.monotonic()
        parsed = keys.parse_key(secret)  # the public key id: unusable-key logins count against it
        attempt = await self._limiter.reserve(client_ip, username, parsed.key_id if parsed else None)
        if attempt is None:
            maillog.auth_failed(client_ip, username, "too_many_failures")
            self._metrics.auth_outcome("throttled")
            return LoginResult(None, replies.AUTH_TOO_MANY, close=True)
        changes = self._changes
        try:
            # an address over its ceiling gets its one check of a new username without a
            # legacy password's hash being computed: a sprayer cannot buy CPU with addresses
            verdict = await self._store.authenticate(username, secret, client_ip,
                                                     slow_ok=not attempt.over_ceiling)
        except KeystoreUnavailable as exc:
            attempt.release()
            reason = "legacy_busy" if isinstance(exc, LegacyBusy) else "keystore_unavailable"
            maillog.auth_failed(client_ip, username, reason)
            self._metrics.auth_outcome(reason)
            return LoginResult(None, replies.AUTH_UNAVAILABLE)
        except BaseException:
            attempt.failed()  # abandoned mid-check (the client went away): it still counts
            self._metrics.auth_outcome("abandoned")
            raise
        if isinstance(verdict, Identity):
            attempt.release()
            maillog.auth_ok(client_ip, verdict.mailbox, verdict.key_id, legacy=verdict.legacy)
            self._metrics.auth_outcome("ok", verdict.key_id)
            if changes == self._changes:  # as in recheck: a change announced meanwhile may postdate the read
                self._checked[_cache_slot(verdict)] = (time.monotonic(), verdict)
            return LoginResult(verdict, replies.AUTH_OK)
        maillog.auth_failed(client_ip, username, verdict.value)
        # a right secret on an unusable key: the key exists, so its id is no made-up label value
        self._metrics.auth_outcome(verdict.value, None if verdict is Reason.BAD_CREDENTIALS or parsed is None
                                   else parsed.key_id)
        delay = attempt.failed() if verdict is Reason.BAD_CREDENTIALS else attempt.unusable()
        answer_at = started + max(delay, FAILURE_FLOOR)
        # within the padding: the failure reaches the cluster's ledger before the client
        # hears of it, so its next try at another node is counted with it
        await self._limiter.flush(answer_at - time.monotonic())
        await asyncio.sleep(answer_at - time.monotonic())
        return LoginResult(None, replies.REASON_REPLIES.get(verdict.value, replies.AUTH_INVALID))

    def key_changed(self, what: str) -> None:
        """A key, mailbox or workspace changed (a PostgreSQL keystore's notification, pushed
        to every relay: keystore/pgnotify.py): drop the rechecks cached about it, so the next
        command of every open session it touches reads the keystore again. 'key:ID' drops
        that key's sessions; anything else (a mailbox, a workspace, '*' after a gap in
        listening) drops them all: such changes are rare, and a recheck is one read."""
        self._changes += 1
        kind, _, name = what.partition(":")
        if kind == "key" and name:
            for slot in [slot for slot in self._checked if slot[0] == name]:
                del self._checked[slot]
        else:
            self._checked.clear()

    def exchange_failed(self, username: str, client_ip: str) -> None:
        """A malformed AUTH exchange (an overlong line) counts like a wrong secret for the
        username it named, if any, and its address."""
        self._limiter.record_failure(client_ip, username)
        self._metrics.auth_outcome("malformed")

    async def recheck(self, identity: Identity, *, fresh: bool = False) -> Identity | str:
        """The session's identity as it stands now, or the reply refusing it.

        Results are cached for `recheck_interval` so a busy pooled connection costs one
        keystore read per interval, while a revoked key still stops within that interval.
        `fresh=True` reads the keystore whatever the cache holds (the end of DATA: the last
        word before a 250), and refreshes the cache.
        """
        slot = _cache_slot(identity)
        now = time.monotonic()
        cached = self._checked.get(slot)
        if not fresh and cached is not None and now - cached[0] < self._recheck_interval:
            verdict = cached[1]
        else:
            changes = self._changes
            try:
                verdict = await self._store.recheck(identity)
            except KeystoreUnavailable:
                return replies.KEYSTORE_DOWN_AT_MAIL
            if len(self._checked) > 100_000:
                self._checked.clear()
            if changes == self._changes:  # a change announced meanwhile may postdate this read
                self._checked[slot] = (now, verdict)
        if isinstance(verdict, Identity):
            return verdict
        return replies.REASON_REPLIES.get(verdict.value, replies.AUTH_INVALID)


def _cache_slot(identity: Identity) -> tuple[str, str, bytes, str]:
    """Sessions share a recheck only if they logged in as the same mailbox with the same
    secret from the same address: after a rotation, the old secret's sessions and the new
    one's part ways, and a key's allow-from narrowed ends only the sessions outside it."""
    return identity.key_id, identity.mailbox, identity.secret_hash, identity.client_ip
