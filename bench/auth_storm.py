"""An AUTH storm from one address, through the real relay: how many keystore checks it costs,
and whether a valid key of another mailbox behind the same address still gets in.

    .venv/bin/python bench/auth_storm.py [--clients 25] [--max-failures 10]

Runs the relay in this process (its own keystore, spool and certificate in a temporary
folder) and counts the secret checks its KeyStore makes (the store's `authenticate` is
wrapped with a counter; nothing else changes). It prints:
  * 25 concurrent wrong AUTHs for one username over 25 TLS sessions: keystore checks made,
    replies, wall time (the budget is `[auth] max_failures`);
  * the same storm spread over 25 usernames: each username has a budget of its own, so
    this is the per-address ceiling's business;
  * then, from the same address: a valid key of another mailbox, connect + STARTTLS + AUTH
    and the AUTH round trip alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib  # noqa: E402

from keystore import keys  # noqa: E402
from keystore.store import KeyStore  # noqa: E402
from relay.app import Relay, loop_factory  # noqa: E402
from relay.config import load_config  # noqa: E402
from tests.support.relayrun import client_tls, write_config  # noqa: E402


class CheckCounter:
    def __init__(self, store: KeyStore) -> None:
        self.count = 0
        original = store.authenticate

        async def counted(*args, **kwargs):
            self.count += 1
            return await original(*args, **kwargs)

        store.authenticate = counted  # type: ignore[method-assign]


async def connect(port: int, folder: Path) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                             tls_context=client_tls(folder), timeout=30)
    await client.connect()
    await client.ehlo()
    return client


async def auth_plain(client: aiosmtplib.SMTP, username: str, secret: str) -> int:
    token = base64.b64encode(f"\0{username}\0{secret}".encode())
    try:
        code, _ = await client.execute_command(b"AUTH", b"PLAIN", token)
    except aiosmtplib.SMTPServerDisconnected:
        return 0
    return code


async def storm(relay: Relay, folder: Path, counter: CheckCounter, pairs: list[tuple[str, str]]) -> str:
    clients = await asyncio.gather(*(connect(relay.port(), folder) for _ in pairs))
    before = counter.count
    started = time.perf_counter()
    codes = await asyncio.gather(*(auth_plain(c, u, s) for c, (u, s) in zip(clients, pairs, strict=True)))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    replies = ", ".join(f"{n} x {code or 'closed'}" for code, n in sorted(Counter(codes).items()))
    return f"{counter.count - before:3d} keystore checks   replies: {replies}   ({elapsed:.2f} s)"


async def main(clients: int, max_failures: int) -> None:
    logging.getLogger("relay").setLevel(logging.ERROR)  # one "auth_failed" line per AUTH otherwise
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd: a deprecation warning per login
    folder = Path(tempfile.mkdtemp(prefix="auth-storm-"))
    config = load_config(write_config(folder, 2525, auth=f"max_failures = {max_failures}"))
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox("alice@example.com", workspace="w", actor="bench")
    await store.add_mailbox("bob@example.com", workspace="w", actor="bench")
    _, alice = await store.create_key(mailbox="alice@example.com", name="k", actor="bench")
    _, bob = await store.create_key(mailbox="bob@example.com", name="k", actor="bench")
    await store.close()
    relay = Relay(config)
    await relay.start()
    assert relay.store is not None
    counter = CheckCounter(relay.store)
    alice_id = keys.parse_key(alice).key_id  # type: ignore[union-attr]

    def wrong() -> str:  # well formed, right key id, wrong secret: it reaches the keystore
        return keys.format_key(alice_id, keys.generate_secret())

    try:
        one_user = await storm(relay, folder, counter, [("alice@example.com", wrong())] * clients)
        spread = await storm(relay, folder, counter,
                             [(f"user{n}@example.com", wrong()) for n in range(clients)])
        before = counter.count
        started = time.perf_counter()
        client = await connect(relay.port(), folder)
        auth_started = time.perf_counter()
        code = await auth_plain(client, "bob@example.com", bob)
        done = time.perf_counter()
        client.close()
        assert counter.count - before == 1
    finally:
        await relay.stop(grace=0.5)
    print(f"AUTH storm from one address, [auth] max_failures = {max_failures}, "
          f"max_failures_per_address = {config.auth.address_ceiling}")
    print(f"  {clients} concurrent wrong AUTHs, one username:   {one_user}")
    print(f"  {clients} concurrent wrong AUTHs, {clients} usernames:  {spread}")
    print(f"  then a valid key of another mailbox, same address: {code}, "
          f"connect+STARTTLS+AUTH {(done - started) * 1000:.1f} ms, "
          f"AUTH alone {(done - auth_started) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=25)
    parser.add_argument("--max-failures", type=int, default=10)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main(args.clients, args.max_failures))
