"""What a legacy-password AUTH costs, per hash scheme, beside an auth key's (issue 13).

    .venv/bin/python bench/legacy_auth.py [--logins 40] [--relay-samples 30]

One run, one throwaway sqlite keystore holding an auth key and one imported legacy
password per scheme, hashed by the real tools with their defaults: `doveadm pw` for
SHA512-CRYPT, SHA256-CRYPT, BLF-CRYPT and ARGON2ID, `htpasswd -B` for Apache's bcrypt, and
BLF-CRYPT at cost 10 and 12 (libpass) for the slower settings some sites chose. Per line:

* `KeyStore.authenticate` with the right secret, each login checking the hash (the cache
  turned off): median and p99, and the check processes' CPU per login;
* the same with the cache on (a client that reconnects within the hour);
* logins per second with 32 in flight, cache off: what [auth] legacy_verifications = 2
  (the default: two check processes) lets through per second, the ceiling a sprayer meets;
* through the real relay (STARTTLS, aiosmtplib): the AUTH PLAIN round trip, cache off.

A wrong password costs the same hash as a right one and is answered after 0.5 s
(keystore/legacy.LEGACY_FAILURE_FLOOR), so it is not timed here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib  # noqa: E402
from passlib.hash import bcrypt  # noqa: E402

from keystore.legacy import LegacyVerifier  # noqa: E402
from keystore.models import Identity  # noqa: E402
from keystore.passwdfile import read_dovecot_passwd  # noqa: E402
from keystore.store import KeyStore  # noqa: E402
from relay.app import Relay  # noqa: E402
from relay.config import load_config  # noqa: E402
from tests.support.relayrun import client_tls, write_config  # noqa: E402

IP = "192.0.2.1"
PASSWORD = "correct horse battery staple"


def hashes() -> dict[str, str]:
    """Line label -> passwd-file password field, made by the real tools."""
    def doveadm(scheme: str) -> str:
        return subprocess.run(["doveadm", "pw", "-s", scheme, "-p", PASSWORD], check=True,
                              capture_output=True, text=True).stdout.strip()

    htpasswd = subprocess.run(["htpasswd", "-nbB", "u", PASSWORD], check=True, capture_output=True,
                              text=True).stdout.strip().split(":", 1)[1]
    return {
        "SHA512-CRYPT (doveadm)": doveadm("SHA512-CRYPT"),
        "SHA256-CRYPT (doveadm)": doveadm("SHA256-CRYPT"),
        "BLF-CRYPT cost 5 (doveadm)": doveadm("BLF-CRYPT"),
        "bcrypt cost 5 (htpasswd -B)": htpasswd,
        "BLF-CRYPT cost 10": "{BLF-CRYPT}" + bcrypt.using(rounds=10, ident="2y").hash(PASSWORD),
        "BLF-CRYPT cost 12": "{BLF-CRYPT}" + bcrypt.using(rounds=12, ident="2y").hash(PASSWORD),
        "ARGON2ID (doveadm)": doveadm("ARGON2ID"),
    }


def children_cpu() -> float:
    """CPU seconds used so far by this process's children (the check processes), from /proc."""
    me, total = os.getpid(), 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def warm(store: KeyStore, user: str) -> None:
    """Start both check processes (each imports libpass once) before anything is timed."""
    await asyncio.gather(*(store.authenticate(user, PASSWORD, IP) for _ in range(8)))


async def timed(n: int, one: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        outcome = await one()
        out.append(time.perf_counter() - started)
        if not isinstance(outcome, Identity):
            raise SystemExit(f"login refused: {outcome!r}")
    return out


def line(label: str, values: list[float], extra: str = "") -> None:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"  {label:30} median {statistics.median(ordered) * 1000:8.2f} ms   "
          f"p99 {p99 * 1000:8.2f} ms{extra}")


async def main(logins: int, relay_samples: int) -> None:
    logging.getLogger("relay").setLevel(logging.ERROR)
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's login_data notice, each AUTH
    folder = Path(tempfile.mkdtemp(prefix="legacy-auth-"))
    config = load_config(write_config(folder, 0, auth="max_failures = 1000000"))
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    made = hashes()
    users = {label: f"user{i}@example.com" for i, label in enumerate(made)}
    entries, bad = read_dovecot_passwd("\n".join(f"{users[label]}:{field}" for label, field in made.items()))
    assert not bad, bad
    await store.import_legacy(entries, source="bench", actor="bench")
    await store.add_mailbox("key@example.com", workspace="example.com", actor="bench")
    _, key = await store.create_key(mailbox="key@example.com", name="bench", actor="bench")
    print(f"python {platform.python_version()}, {os.cpu_count()} cores; {logins} logins per line "
          "(ARGON2ID: a quarter); [auth] legacy_verifications = 2")
    print()
    print("KeyStore.authenticate, right password, one at a time")
    line("auth key (HMAC-SHA256)",
         await timed(logins * 25, lambda: store.authenticate("key@example.com", key, IP)))
    store.legacy = LegacyVerifier(cache_ttl=0)  # every login computes its hash
    await warm(store, users["SHA512-CRYPT (doveadm)"])
    for label in made:
        n = max(4, logins // 4) if "ARGON2" in label else logins
        before = children_cpu()
        values = await timed(n, lambda label=label: store.authenticate(users[label], PASSWORD, IP))
        cpu = (children_cpu() - before) / n
        line(label, values, f"   check CPU {cpu * 1000:7.1f} ms")
    print()
    print("the same, answered from the cache of recent successes (cache on)")
    store.legacy.close()
    store.legacy = LegacyVerifier()
    for label in made:
        await store.authenticate(users[label], PASSWORD, IP)
        line(label, await timed(logins, lambda label=label: store.authenticate(users[label], PASSWORD, IP)))
    print()
    print("logins per second, 32 in flight, cache off (two check processes)")
    store.legacy.close()
    store.legacy = LegacyVerifier(cache_ttl=0, queue=1000)
    await warm(store, users["SHA512-CRYPT (doveadm)"])
    for label in made:
        n = 32 if "ARGON2" in label else 128
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(store.authenticate(users[label], PASSWORD, IP) for _ in range(n)))
        assert all(isinstance(o, Identity) for o in outcomes)
        print(f"  {label:30} {n / (time.perf_counter() - started):8.1f} logins/s")
    store.legacy.close()
    await store.close()

    print()
    print(f"through the relay: AUTH PLAIN round trip over STARTTLS, {relay_samples} samples, cache off")
    relay = Relay(config)
    await relay.start()
    relay.store.legacy = LegacyVerifier(cache_ttl=0)
    try:
        async def auth_once(user: str, password: str) -> float:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port(), start_tls=True,
                                     tls_context=client_tls(folder), timeout=30)
            await client.connect()
            await client.ehlo()
            token = base64.b64encode(f"\0{user}\0{password}".encode())
            started = time.perf_counter()
            code, _ = await client.execute_command(b"AUTH", b"PLAIN", token)
            took = time.perf_counter() - started
            client.close()
            assert code == 235, code
            return took

        await auth_once(users["SHA512-CRYPT (doveadm)"], PASSWORD)
        line("auth key", [await auth_once("key@example.com", key) for _ in range(relay_samples)])
        for label in made:
            n = max(4, relay_samples // 4) if "ARGON2" in label else relay_samples
            line(label, [await auth_once(users[label], PASSWORD) for _ in range(n)])
    finally:
        await relay.stop(grace=0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=40)
    parser.add_argument("--relay-samples", type=int, default=30)
    options = parser.parse_args()
    asyncio.run(main(options.logins, options.relay_samples))
