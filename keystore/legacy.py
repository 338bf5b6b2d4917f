"""Legacy passwords (issue 13): the password hashes operators bring from Postfix + Dovecot
(a Dovecot passwd-file) or an htpasswd file, kept as they are and verified with libpass,
so users keep logging in with the passwords they have while they move to auth keys.

Two jobs, both here so the rules about schemes live in one place:

* `classify`: which hashes are accepted at import. Only slow, salted password hashes:
  SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT (bcrypt) and ARGON2I/ARGON2ID. Plain text, fast
  digests (PLAIN-MD5, SHA, SSHA512...), DES crypt and MD5-crypt are refused, as are
  unknown schemes and costs so high that one login would stall a worker for seconds.
* `LegacyVerifier`: checking a password against its hash without stalling the relay.
  A hash is slow on purpose (Dovecot's ARGON2ID default costs 64 MiB and about 0.2 s of a
  core), so verifications run in a bounded pool of `workers` processes, at most that many
  at once, with at most `queue` waiting; past that a login is told to come back (454
  4.7.0), never queued without end. Processes, not threads: libpass computes SHA512-CRYPT
  in pure Python, holding the interpreter lock, and two threads doing so held the event
  loop up to 13 ms at a time (bcrypt and argon2 release it; measured in the closing note
  of issue 13). The pool starts at the first legacy login, so a relay without legacy
  passwords pays nothing for it. The relay's AUTH throttle is asked before any of this
  (relay/auth.py), and an address over its ceiling gets no hash at all (`slow_ok=False`):
  only the cache below.

  A successful verification is remembered as an HMAC of the password under a per-process
  key, per credential and per stored hash (its fingerprint): the next login of a client
  that reconnects every minute costs one HMAC, and a changed hash (a re-import with a new
  password) or an expired entry (`cache_ttl`) means a full check again. The password
  itself is never kept.

Keys (rak_...) never come here: they are random, so one keyed hash is enough (keys.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import secrets
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from passlib.context import CryptContext

from keystore.errors import KeystoreUnavailable

__all__ = [
    "ACCEPTED",
    "LEGACY_FAILURE_FLOOR",
    "BadLine",
    "LegacyEntry",
    "HashRefused",
    "LegacyBusy",
    "LegacyVerifier",
    "classify",
    "fingerprint",
]

log = logging.getLogger("keystore.legacy")

# libpass scheme -> the name operators know it by (Dovecot's)
ACCEPTED = {
    "sha512_crypt": "SHA512-CRYPT",
    "sha256_crypt": "SHA256-CRYPT",
    "bcrypt": "BLF-CRYPT",
    "argon2": "ARGON2",
}
# Recognised only to be refused by name: fast or broken hashes a stolen file gives up at once.
_WEAK = {
    "des_crypt": "DES crypt",
    "bigcrypt": "DES crypt",
    "bsdi_crypt": "BSDi DES crypt",
    "md5_crypt": "MD5-CRYPT",
    "apr_md5_crypt": "Apache MD5 ($apr1$)",
    "sun_md5_crypt": "Sun MD5 crypt",
    "sha1_crypt": "SHA1 crypt",
    "ldap_md5": "LDAP-MD5",
    "ldap_salted_md5": "SMD5",
    "ldap_sha1": "SHA",
    "ldap_salted_sha1": "SSHA",
    "ldap_salted_sha256": "SSHA256",
    "ldap_salted_sha512": "SSHA512",
}
_CONTEXT = CryptContext(schemes=[*ACCEPTED, *_WEAK])

# Dovecot's {SCHEME} prefixes: accepted ones name the libpass scheme the hash must be
# ("CRYPT": whichever crypt(3) format it is); the rest are refused with their reason.
_DOVECOT_ACCEPTED = {
    "SHA512-CRYPT": "sha512_crypt", "SHA256-CRYPT": "sha256_crypt", "BLF-CRYPT": "bcrypt",
    "ARGON2ID": "argon2", "ARGON2I": "argon2", "CRYPT": None,
}
_DOVECOT_PLAIN = {"PLAIN", "CLEAR", "CLEARTEXT", "PLAIN-TRUNC", "PLAIN-MD4"}
_DOVECOT_WEAK = {
    "MD5-CRYPT", "DES-CRYPT", "PLAIN-MD5", "LDAP-MD5", "MD5", "SMD5", "SHA", "SHA1", "SSHA",
    "SHA256", "SSHA256", "SHA512", "SSHA512", "CRAM-MD5", "HMAC-MD5", "DIGEST-MD5", "LANMAN",
    "NTLM", "RPA", "OTP", "SKEY",
}
_SCHEME_NAME_RE = re.compile(r"^[A-Z0-9][A-Z0-9.-]{0,31}$")
# Other schemes Dovecot knows (`doveadm pw -l`, and older ones), named when refused. Any other
# "{...}" is not: `user:{Summer2024}` is a plain-text password in braces, and naming its
# "scheme" would print the password in the refusal.
_DOVECOT_OTHER = {"SCRAM-SHA-1", "SCRAM-SHA-256", "PBKDF2", "RPA", "LANMAN", "NTLM", "SKEY", "OTP",
                  "WHIRLPOOL", "SHA224", "SHA384", "SHA3-256", "SHA3-512", "MD4", "SHA1-CRYPT"}
_DOVECOT_ENCODINGS = (".HEX", ".B64", ".BASE64")  # {SHA256.HEX}: a digest's encoding

# The most a hash may cost to be imported: past these, one login keeps a worker (and with
# ARGON2 its memory) busy for seconds, which a sprayer would turn against everyone.
MAX_CRYPT_ROUNDS = 1_000_000  # SHA*-CRYPT (Dovecot's default: 5,000)
MAX_BCRYPT_COST = 15  # BLF-CRYPT (Dovecot's default: 5, htpasswd -B: 5)
MAX_ARGON2_MEMORY_KIB = 1 << 20  # 1 GiB (Dovecot's default: 64 MiB)
MAX_ARGON2_TIME = 64
# ARGON2's time is memory x passes (64 MiB x 3: 0.2 s of a core): 2 GiB passes, about 2 s, as
# bcrypt's cost 15 (Dovecot's default: 192 MiB passes). Each bound above alone lets through
# 1 GiB x 64 passes, a minute a login.
MAX_ARGON2_WORK = 2 << 20
# The longest hash imported, in characters. Dovecot's and htpasswd's are 60 (BLF-CRYPT) to about
# 120 (SHA512-CRYPT with rounds=, ARGON2ID); a longer one is a line run together with another,
# or garbage, and would be read from the database and sent to a check process at every login.
MAX_HASH_LENGTH = 1024
# The longest password checked, in UTF-8 bytes. SHA*-CRYPT's work grows with the
# password's length (a 1,500-byte guess costs six times a short one: 5 s of a check
# process at 1,000,000 rounds), so a longer one is refused without a hash, as a wrong
# password. People's passwords are far shorter; a password manager's are 64 or so.
MAX_PASSWORD_BYTES = 256

# A refused legacy-password login is answered no sooner than this after the AUTH (relay/auth.py
# pads it): a hash takes milliseconds to a fraction of a second to check, and no check at all is
# made for a mailbox without a legacy password, so without the pad the answer's time would tell a
# stranger which mailboxes have one. Dovecot waits longer still (auth_failure_delay, 2 s).
LEGACY_FAILURE_FLOOR = 0.5


@dataclass(frozen=True, slots=True)
class LegacyEntry:
    """One user to import; `repr` leaves the hash out, so no log or traceback shows it."""

    line: int
    address: str
    scheme: str
    password_hash: str
    allow_from: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"LegacyEntry(line={self.line}, address={self.address!r}, scheme={self.scheme!r})"


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    user: str | None  # as written, when the line got that far (no secret in it)
    why: str

    def __str__(self) -> str:
        return f"line {self.line}" + (f" ({self.user})" if self.user else "") + f": {self.why}"


class HashRefused(ValueError):
    """A hash that is not imported; the message says why, never showing the hash."""


class LegacyBusy(KeystoreUnavailable):
    """Too many password verifications waiting: the login is answered 454 4.7.0, try later
    (as when the keystore cannot be asked), and counts as no failure."""


def classify(text: str, *, dovecot: bool) -> tuple[str, str]:
    """(libpass scheme, hash as stored) for an accepted hash, else HashRefused saying why.

    `dovecot`: the text may carry Dovecot's "{SCHEME}" prefix (a passwd-file); the prefix
    must agree with the hash. Without one, the hash is identified by its own form."""
    hashed, named = text, None
    if dovecot and text.startswith("{"):
        end = text.find("}")
        prefix = text[1:end].upper() if end > 0 else ""
        if not _SCHEME_NAME_RE.match(prefix):
            raise HashRefused("unreadable {SCHEME} prefix")
        hashed = text[end + 1:]
        if prefix in _DOVECOT_PLAIN:
            raise HashRefused(f"plain-text password ({{{prefix}}}): not imported; hash it first "
                              "(doveadm pw -s SHA512-CRYPT) or give the user an auth key")
        if prefix in _DOVECOT_WEAK:
            raise HashRefused(f"weak scheme {{{prefix}}}: a stolen copy is cracked quickly; "
                              "have the user set a new password, or give them an auth key")
        if prefix not in _DOVECOT_ACCEPTED:
            base = next((prefix.removesuffix(e) for e in _DOVECOT_ENCODINGS if prefix.endswith(e)), prefix)
            known = base in _DOVECOT_OTHER or base in _DOVECOT_WEAK or base in _DOVECOT_PLAIN \
                or base in _DOVECOT_ACCEPTED
            raise HashRefused((f"unknown scheme {{{prefix}}}" if known else "unknown {SCHEME} prefix")
                              + " (accepted: SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT, ARGON2ID, ARGON2I)")
        named = _DOVECOT_ACCEPTED[prefix] or ""
        if prefix in ("ARGON2ID", "ARGON2I") and not hashed.startswith(f"${prefix.lower()}$"):
            raise HashRefused(f"the hash is not {{{prefix}}}")
    if not hashed:
        raise HashRefused("no password hash")
    if len(hashed) > MAX_HASH_LENGTH:
        raise HashRefused(f"longer than {MAX_HASH_LENGTH} characters: not a password hash")
    scheme = _CONTEXT.identify(hashed, required=False)
    if scheme is None:
        raise HashRefused("unknown scheme (plain text, or a hash libpass does not know)")
    if scheme in _WEAK:
        raise HashRefused(f"weak scheme {_WEAK[scheme]}: a stolen copy is cracked quickly; have the "
                          "user set a new password, or give them an auth key")
    if named and scheme != named:
        raise HashRefused(f"the hash is {ACCEPTED[scheme]}, not what its prefix says")
    try:
        record = _CONTEXT.handler(scheme).from_string(hashed)
    except (ValueError, TypeError):  # libpass's argon2 says TypeError of a salt that is not base64
        raise HashRefused(f"malformed {ACCEPTED[scheme]} hash") from None
    if not getattr(record, "checksum", None):
        # libpass reads "$6$salt" (a line cut short after the salt) as a configuration string:
        # imported, it could never match, and every login with it would be refused
        raise HashRefused(f"malformed {ACCEPTED[scheme]} hash: a salt without the hash itself "
                          "(the line is cut short?)")
    _check_cost(scheme, record)
    return scheme, hashed


def _check_cost(scheme: str, record: object) -> None:
    rounds = getattr(record, "rounds", 0) or 0
    if scheme in ("sha512_crypt", "sha256_crypt") and rounds > MAX_CRYPT_ROUNDS:
        raise HashRefused(f"{ACCEPTED[scheme]} rounds={rounds} is more than {MAX_CRYPT_ROUNDS}: "
                          "one login would take seconds")
    if scheme == "bcrypt" and rounds > MAX_BCRYPT_COST:
        raise HashRefused(f"BLF-CRYPT cost {rounds} is more than {MAX_BCRYPT_COST}: one login "
                          "would take seconds")
    if scheme == "argon2":
        memory = getattr(record, "memory_cost", 0) or 0
        if memory > MAX_ARGON2_MEMORY_KIB or rounds > MAX_ARGON2_TIME:
            raise HashRefused(f"ARGON2 m={memory},t={rounds} is more than m={MAX_ARGON2_MEMORY_KIB},"
                              f"t={MAX_ARGON2_TIME}: one login would take seconds and that memory")
        if memory * rounds > MAX_ARGON2_WORK:
            raise HashRefused(f"ARGON2 m={memory},t={rounds} is more than m x t = {MAX_ARGON2_WORK} "
                              "(KiB passes): one login would take seconds")


def fingerprint(pepper: bytes, credential_id: str, password_hash: str) -> bytes:
    """What a legacy credential stores as its secret_hash: a keyed hash of the stored
    password hash. A session logged in with the password carries it, so the re-check ends
    the session when the hash changes (a re-import with a new password), as a rotated
    key's sessions end. Its message ("legacy:<id>:...") can never be a key's ("<id>:...",
    an id has no colon)."""
    return hmac.new(pepper, f"legacy:{credential_id}:{password_hash}".encode(), hashlib.sha256).digest()


@dataclass(slots=True)
class _Remembered:
    tag: bytes
    at: float


Observer = Callable[[str, str], None]  # (scheme, outcome): match, mismatch, cached, busy, skipped


class LegacyVerifier:
    """Checks passwords against legacy hashes off the event loop (see the module docstring)."""

    def __init__(self, *, workers: int = 2, queue: int = 64, cache_ttl: float = 3600.0,
                 cache_size: int = 10_000) -> None:
        self._cache_key = secrets.token_bytes(32)  # per process: a dump of memory is of one run
        self._workers = workers
        self._queue = queue
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], _Remembered] = OrderedDict()
        self._pool: ProcessPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._owed = 0  # places a reload took away while their checks ran (_resize)
        self._running = 0
        self.verifications: dict[str, int] = {}  # hashes computed, by scheme
        self.most_at_once = 0  # the most verifications that ever ran at once (a test reads it)
        self.observer: Observer | None = None

    def configure(self, *, workers: int, queue: int, observer: Observer | None = None) -> None:
        """The relay's [auth] settings; applies to the next verification started."""
        if workers < 1 or queue < 0:
            raise ValueError("legacy verification needs at least one worker and a queue of 0 or more")
        if workers != self._workers:
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # checks running finish in the old processes
                self._pool = None
            if self._slots is not None:
                self._resize(self._slots, workers - self._workers)
        self._workers, self._queue = workers, queue
        if observer is not None:
            self.observer = observer

    def _resize(self, slots: asyncio.Semaphore, change: int) -> None:
        """Places added or taken away (a reload). The checks under way keep theirs, so a
        place taken away is owed (`_owed`): the next place given back or taken is dropped
        instead, and no more than the new number of checks run at once, even while the old
        pool's last checks finish."""
        if change < 0:
            self._owed -= change
            return
        repaid = min(change, self._owed)
        self._owed -= repaid
        for _ in range(change - repaid):
            slots.release()

    def _give_back(self, slots: asyncio.Semaphore) -> None:
        if self._owed:  # a reload took places away: this one goes
            self._owed -= 1
        else:
            slots.release()

    def _started_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers, initializer=_worker_started,
                # spawn: a fork of a process running an event loop and threads is unsafe
                mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def _pool_broke(self, pool: ProcessPoolExecutor) -> None:
        """One of `pool`'s processes died: the next check starts a new pool. Only if it is
        still the current one: the checks of a broken pool learn of it one by one, and the
        last of them must not shut down the pool a waiting check has started since."""
        if self._pool is pool:
            log.error("a legacy-password check process died; starting new ones")
            pool.shutdown(wait=False)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _tell(self, scheme: str, outcome: str) -> None:
        if self.observer is not None:
            self.observer(scheme, outcome)

    def _tag(self, credential_id: str, password: str) -> bytes:
        return hmac.new(self._cache_key, f"{credential_id}\x00{password}".encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def _remembered(self, slot: tuple[str, bytes], tag: bytes) -> bool:
        entry = self._cache.get(slot)
        if entry is None:
            return False
        if time.monotonic() - entry.at >= self._cache_ttl:
            del self._cache[slot]
            return False
        return hmac.compare_digest(entry.tag, tag)

    def _remember(self, slot: tuple[str, bytes], tag: bytes) -> None:
        self._cache[slot] = _Remembered(tag, time.monotonic())
        self._cache.move_to_end(slot)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _full(self) -> bool:
        return self._slots is not None and self._slots.locked() and self._waiting >= self._queue

    async def wait_without_credential(self, password: str, *, slow_ok: bool) -> None:
        """For a mailbox without a legacy password: what `verify` would do short of the
        hash (a stranger's guess is never in the cache). LegacyBusy exactly when `verify`
        would raise it; else, while checks wait for a place, wait for one too (and give it
        back at once). Otherwise a busy pool would tell which mailboxes have a password:
        454 at once for those and 535 after the pad for the others, or, by time, theirs
        waiting their turn (seconds, past LEGACY_FAILURE_FLOOR) and the others not."""
        if _too_long(password) or not slow_ok:
            return
        if self._full():
            raise LegacyBusy("too many password verifications waiting")
        slots = self._slots
        if slots is None or not slots.locked():
            return
        self._waiting += 1
        try:
            await slots.acquire()
        finally:
            self._waiting -= 1
        slots.release()  # the place taken, given back as taken (a reload's debt stays to its checks)

    async def verify(self, credential_id: str, stored: bytes, scheme: str, password_hash: str,
                     password: str, *, slow_ok: bool = True) -> bool:
        """Whether `password` is the one `password_hash` was made from. `stored`: the
        credential's fingerprint (a cache entry holds only while it is unchanged).
        `slow_ok=False`: answer from the cache alone (an address over its AUTH ceiling).
        LegacyBusy when `queue` verifications are already waiting."""
        if _too_long(password):
            self._tell(scheme, "skipped")
            return False
        slot = (credential_id, stored)
        tag = self._tag(credential_id, password)
        if self._remembered(slot, tag):
            self._tell(scheme, "cached")
            return True
        if not slow_ok:
            self._tell(scheme, "skipped")
            return False
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        if self._full():
            self._tell(scheme, "busy")
            raise LegacyBusy("too many password verifications waiting")
        slots = self._slots
        self._waiting += 1
        try:
            await slots.acquire()
            while self._owed:  # a place taken away by a reload: dropped, and wait for another
                self._owed -= 1
                await slots.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            pool = self._started_pool()
            try:
                future = loop.run_in_executor(pool, _check, scheme, password_hash, password)
            except BrokenProcessPool:
                # a process of an idle pool died (the OOM killer, an operator's kill): the
                # pool takes no more work; this check goes to new processes
                self._pool_broke(pool)
                pool = self._started_pool()
                future = loop.run_in_executor(pool, _check, scheme, password_hash, password)
        except BaseException:
            self._give_back(slots)
            raise
        self.verifications[scheme] = self.verifications.get(scheme, 0) + 1
        self._running += 1
        self.most_at_once = max(self.most_at_once, self._running)

        def done(finished: asyncio.Future[bool]) -> None:
            # when the hash is done, not when the caller stops waiting: a client that hangs
            # up mid-check keeps its place until then (no more than `workers` run at once),
            # and the hash it cost is counted all the same
            self._running -= 1
            self._give_back(slots)
            if finished.cancelled():
                return
            error = finished.exception()
            if error is None:
                self._tell(scheme, "match" if finished.result() else "mismatch")
            elif isinstance(error, BrokenProcessPool):
                self._pool_broke(pool)

        future.add_done_callback(done)
        try:
            matched = await asyncio.shield(future)
        except BrokenProcessPool:
            # a worker died mid-check (killed, out of memory): the next check starts a new pool
            self._tell(scheme, "busy")
            raise LegacyBusy("the password check could not be made") from None
        if matched:
            self._remember(slot, tag)
        return matched


def _too_long(password: str) -> bool:
    return len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES


def _worker_started() -> None:
    """In each check process: ^C at `make run` and the relay's reload signal are the
    parent's business (it shuts the pool down); a worker must not die of them. But it
    dies with the parent: a relay killed (kill -9, the OOM killer) never shuts its pool
    down, and its check processes, waiting for work that cannot come, would live on (one
    interpreter each, one set more at every restart)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True,
                         name="legacy-parent-watch").start()


def _exit_with_parent(sentinel: int) -> None:
    """In a check process: wait for the parent to end, then end at once (mid-check too: its
    answer has no one to go to)."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _check(scheme: str, password_hash: str, password: str) -> bool:
    """In a check process. A password libpass cannot take (bcrypt and a NUL byte) is
    simply not the password; a stored hash it cannot read is logged, without the hash."""
    secret: str | bytes = password
    if scheme == "bcrypt":
        # bcrypt reads 72 bytes; Dovecot's and Apache's bcrypt cut longer passwords there,
        # so the hash they made is of that cut (libpass refuses to cut)
        secret = password.encode("utf-8", "surrogatepass")[:72]
    try:
        return bool(_CONTEXT.verify(secret, password_hash, scheme=scheme))
    except (ValueError, TypeError) as exc:
        if "NUL" not in str(exc) and "null" not in str(exc).lower():
            log.warning("a stored %s hash could not be checked: %s", ACCEPTED.get(scheme, scheme),
                        type(exc).__name__)
        return False
