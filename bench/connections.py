"""Connection flood benchmark: 1,000 idle connections from one address, and a bystander.

    .venv/bin/python bench/connections.py [--idle 1000] [--loop uvloop|asyncio]

One scanner address (127.0.0.1) opens --idle connections to 587 and holds them silent,
then --idle more to 465 that never send a ClientHello (TLS handshakes in progress). A
client from another address (127.0.0.2; Linux routes all of 127/8 to the loopback) then
connects, does STARTTLS, AUTH PLAIN and sends one message. Two relays in the same run:

  * "no per-address cap": max_connections_per_address = max_connections, which is what
    the relay did before it had the setting (only a global cap);
  * "defaults": max_connections = 1000, max_connections_per_address = 50.

It prints, per relay: how many of the scanner's connections were greeted and how many
refused with 421, and the bystander's connect..250 time before the flood (baseline), with
the 587 flood and with the 465 handshakes on top, or the reply that refused it. The
relay runs with pre_auth_timeout 30 s, so the scanner's sessions are still open when the
bystander is timed. Runs in well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from submission import free_port, wait_port  # noqa: E402

from keystore.store import KeyStore  # noqa: E402
from relay.tlsconf import generate_self_signed  # noqa: E402

SCANNER = "127.0.0.1"
BYSTANDER = "127.0.0.2"
SENDER = "bench@example.com"

CONFIG = """
[server]
hostname = "localhost"
submission = ["127.0.0.1:{port}"]
submissions = ["127.0.0.1:{implicit_port}"]
max_connections = {max_connections}
max_connections_per_address = {per_address}
rate_per_minute = 0

[tls]
cert = "cert.pem"
key = "key.pem"

[keystore]
path = "keystore.db"
pepper_file = "pepper"

[queue]
path = "spool.db"

[routing]
default = "sink"

[[upstream]]
name = "sink"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
"""


def raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        sys.exit(f"bench/connections.py: needs {needed} open files; the hard limit is {hard}")


@dataclass
class Bystander:
    seconds: float | None = None  # connect .. 250 after DATA
    refused: str = ""


@dataclass
class Run:
    label: str
    greeted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    opened_in: float = 0.0
    baseline: list[float] = field(default_factory=list)
    flooded: Bystander = field(default_factory=Bystander)
    with_handshakes: Bystander = field(default_factory=Bystander)
    implicit: Bystander = field(default_factory=Bystander)  # on 465, with everything held
    delivered: int = 0


async def bystander(port: int, tls: ssl.SSLContext, secret: str, *, implicit: bool = False) -> Bystander:
    started = time.perf_counter()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=tls, timeout=10,
                             source_address=(BYSTANDER, 0), use_tls=implicit)
    try:
        await client.connect()
        await client.login(SENDER, secret)
        await client.sendmail(SENDER, ["someone@example.net"],
                              f"From: {SENDER}\r\nSubject: bystander\r\n\r\nhello\r\n".encode())
        elapsed = time.perf_counter() - started
        await client.quit()
        return Bystander(seconds=elapsed)
    except aiosmtplib.SMTPException as exc:
        client.close()
        return Bystander(refused=str(exc))


async def open_idle(port: int, count: int) -> tuple[list[asyncio.StreamWriter], int, dict[str, int]]:
    """`count` connections from the scanner address that say nothing after the greeting."""
    async def one() -> tuple[asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(SCANNER, 0))
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        except (TimeoutError, ConnectionError):
            line = b""
        return writer, line

    writers, greeted, refused = [], 0, {}
    for start in range(0, count, 100):  # 100 at a time: the listen backlog is 100
        for writer, line in await asyncio.gather(*(one() for _ in range(start, min(count, start + 100)))):
            writers.append(writer)
            text = line.decode(errors="replace").strip()
            if text.startswith("220 "):
                greeted += 1
            else:
                refused[text or "(closed)"] = refused.get(text or "(closed)", 0) + 1
    return writers, greeted, refused


async def open_stalled_handshakes(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for start in range(0, count, 100):
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port, local_addr=(SCANNER, 0))
                                        for _ in range(start, min(count, start + 100))))
        writers.extend(writer for _, writer in opened)
    return writers


def count_delivered(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


async def run_relay(args: argparse.Namespace, folder: Path, secret: str, label: str, per_address: int) -> Run:
    port, implicit_port, sink_port = free_port(), free_port(), free_port()
    (folder / "relay.toml").write_text(CONFIG.format(
        port=port, implicit_port=implicit_port, sink_port=sink_port, max_connections=args.max_connections,
        per_address=per_address,
    ))
    for stale in folder.glob("spool.db*"):
        stale.unlink()
    count_file = folder / "sink.count"
    count_file.unlink(missing_ok=True)
    env = {**os.environ, "RELAY_LOG_LEVEL": "ERROR", "RELAY_EVENT_LOOP": args.loop}
    procs = [
        subprocess.Popen([sys.executable, "bench/sink.py", "--port", str(sink_port), "--count-file",
                          str(count_file)], stdout=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "relay", "--config", str(folder / "relay.toml"), "serve"],
                         env=env),
    ]
    run = Run(label)
    tls = ssl.create_default_context(cafile=str(folder / "cert.pem"))
    tls.check_hostname = False
    held: list[asyncio.StreamWriter] = []
    try:
        for p in (sink_port, port, implicit_port):
            await wait_port(p)
        for _ in range(args.baseline):
            sample = await bystander(port, tls, secret)
            if sample.seconds is None:
                raise RuntimeError(f"bystander refused without a flood: {sample.refused}")
            run.baseline.append(sample.seconds)
        await asyncio.sleep(0.3)  # the relay closes the bystander's last session (TLS close_notify)
        started = time.perf_counter()
        idle, run.greeted, run.refused = await open_idle(port, args.idle)
        run.opened_in = time.perf_counter() - started
        held.extend(idle)
        run.flooded = await bystander(port, tls, secret)
        held.extend(await open_stalled_handshakes(implicit_port, args.idle))
        run.with_handshakes = await bystander(port, tls, secret)
        run.implicit = await bystander(implicit_port, tls, secret, implicit=True)
        sent = [run.flooded, run.with_handshakes, run.implicit]
        expected = len(run.baseline) + sum(sample.seconds is not None for sample in sent)
        deadline = time.monotonic() + 10
        while count_delivered(count_file) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        run.delivered = count_delivered(count_file)
        return run
    finally:
        for writer in held:
            writer.transport.abort()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def describe(sample: Bystander, baseline: float) -> str:
    if sample.seconds is None:
        return f"refused: {sample.refused}"
    return f"{sample.seconds * 1000:7.1f} ms  ({sample.seconds / baseline:.2f}x the baseline)"


async def bench(args: argparse.Namespace) -> None:
    raise_own_fd_limit(2 * args.idle + 200)
    folder = Path(tempfile.mkdtemp(prefix="relay-bench-conn-"))
    try:
        generate_self_signed("localhost", folder / "cert.pem", folder / "key.pem")
        store = await KeyStore.open(folder / "keystore.db", folder / "pepper", create=True)
        await store.add_mailbox(SENDER, workspace="bench", actor="bench")
        _, secret = await store.create_key(mailbox=SENDER, name="bench", actor="bench")
        await store.close()
        runs = [
            await run_relay(args, folder, secret, "no per-address cap (only the global one)",
                            args.max_connections),
            await run_relay(args, folder, secret, "defaults (max_connections_per_address = 50)", 50),
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(f"bench/connections.py: {args.idle} idle connections to 587 from {SCANNER}, then {args.idle} "
          f"stalled TLS handshakes to 465 from it; a bystander from {BYSTANDER} sends one message "
          f"(STARTTLS, AUTH PLAIN, MAIL..250); max_connections = {args.max_connections}; {args.loop} loop")
    for run in runs:
        baseline = statistics.median(run.baseline)
        refused = ", ".join(f"{n} x {text!r}" for text, n in run.refused.items()) or "none"
        print()
        print(f"{run.label}:")
        print(f"  {'scanner connections greeted':38} {run.greeted:5d} (opened in {run.opened_in:.2f} s)")
        print(f"  {'scanner connections refused':38} {refused}")
        label = f"bystander, no flood (median of {len(run.baseline)})"
        print(f"  {label:38} {baseline * 1000:7.1f} ms")
        print(f"  {'bystander, 587 flood held':38} {describe(run.flooded, baseline)}")
        print(f"  {'bystander, + 465 handshakes held':38} {describe(run.with_handshakes, baseline)}")
        print(f"  {'bystander on 465, all of it held':38} {describe(run.implicit, baseline)}")
        print(f"  {'messages at the sink':38} {run.delivered:5d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=1000, help="scanner connections per listener")
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=5, help="bystander sends before the flood")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    started = time.perf_counter()
    asyncio.run(bench(parser.parse_args()))
    print(f"\n(ran in {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
