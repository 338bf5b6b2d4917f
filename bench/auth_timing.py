"""How long a refused AUTH takes, per kind of wrong credential, through the real relay.

    .venv/bin/python bench/auth_timing.py [--samples 300]

Unknown mailbox, unknown key id and wrong secret must be indistinguishable: the figures
should agree to well within their own spread.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiosmtplib  # noqa: E402

from keystore import keys  # noqa: E402
from relay.app import Relay  # noqa: E402
from relay.config import load_config  # noqa: E402
from tests.support.relayrun import client_tls, write_config  # noqa: E402


async def main(samples: int) -> None:
    logging.getLogger("relay").setLevel(logging.ERROR)  # 800 "auth_failed" lines otherwise
    folder = Path(tempfile.mkdtemp(prefix="auth-timing-"))
    config = load_config(write_config(folder, 2525, auth="max_failures = 1000000"))
    from keystore.store import KeyStore

    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.add_mailbox("alice@example.com", workspace="w", actor="bench")
    _, secret = await store.create_key(mailbox="alice@example.com", name="k", actor="bench")
    await store.close()
    relay = Relay(config)
    await relay.start()
    cases = {
        "unknown mailbox": ("nobody@example.com", secret),
        "unknown key id": ("alice@example.com", keys.format_key("a" * 12, keys.generate_secret())),
        "wrong secret": ("alice@example.com", keys.format_key(secret[4:16], keys.generate_secret())),
        "malformed key": ("alice@example.com", "hunter2"),
    }
    async def connect() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port(), start_tls=True,
                                 tls_context=client_tls(folder), timeout=10)
        await client.connect()
        await client.ehlo()
        return client

    try:
        times: dict[str, list[float]] = {name: [] for name in cases}
        client, used = await connect(), 0
        for _ in range(samples):
            for name, (user, password) in cases.items():
                if used == 3:  # the relay allows 3 AUTH commands per connection
                    client.close()
                    client, used = await connect(), 0
                token = base64.b64encode(f"\0{user}\0{password}".encode())
                started = time.perf_counter()
                code, _ = await client.execute_command(b"AUTH", b"PLAIN", token)
                times[name].append(time.perf_counter() - started)
                used += 1
                assert code == 535, code
        client.close()
    finally:
        await relay.stop(grace=0.5)
    print(f"refused AUTH PLAIN round trip, {samples} samples each (535 5.7.8 every time)")
    for name, values in times.items():
        ordered = sorted(values)
        p10, p90 = ordered[len(ordered) // 10], ordered[9 * len(ordered) // 10]
        print(f"  {name:16} median {statistics.median(ordered) * 1000:7.3f} ms   "
              f"p10 {p10 * 1000:7.3f} ms   p90 {p90 * 1000:7.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    asyncio.run(main(parser.parse_args().samples))
