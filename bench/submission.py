"""Submission benchmark: the relay against the bare sink, side by side, in one run.

    .venv/bin/python bench/submission.py [--connections 20] [--messages 100] [--size 4096]
                                         [--compare PATH]

--compare PATH runs the same load, in the same run, through the relay of another checkout
(e.g. `git worktree add /tmp/before <commit>`), so a change's effect is measured against
the same machine at the same moment.

The relay runs pinned to core 0; this process (the load generator) and the sink run on
core 1. It prints:
  * messages/s, p50/p99 latency of 20 authenticated STARTTLS sessions sending 4 KiB
    messages through the relay (which also delivers every one of them to the sink),
  * the same load sent straight to the sink (plain SMTP, no TLS, no AUTH) and the ratio,
  * the AUTH PLAIN round trip on an open TLS session,
  * the relay's RSS growth per idle authenticated TLS session (200 sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadResult, auth_round_trips, idle_sessions, run_load, summary  # noqa: E402

from keystore.store import KeyStore  # noqa: E402
from relay.tlsconf import generate_self_signed  # noqa: E402

CONFIG = """
[server]
hostname = "localhost"
submission = ["127.0.0.1:{port}"]
max_connections = 5000
{per_address}
rate_per_minute = 0

[tls]
cert = "cert.pem"
key = "key.pem"

[auth]
max_failures = 1000

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
max_connections = {upstream_connections}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(core: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") else []) + argv


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_port(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def sink_count(path: Path) -> tuple[int, int, int]:
    """(messages, connections opened, peak concurrent connections) seen by the sink."""
    try:
        count, conns, peak = path.read_text().split()
        return int(count), int(conns), int(peak)
    except (OSError, ValueError):
        return 0, 0, 0


@dataclass
class RelayRun:
    label: str
    accepted: LoadResult
    cpu: float
    delivered: int
    drained: float
    peak: int
    opened: int
    queue_left: int
    auth: list[float] = field(default_factory=list)  # AUTH round trips (this checkout only)
    rss: tuple[int, int] = (0, 0)  # KiB before and with the idle sessions

    @property
    def delivered_rate(self) -> float:
        return self.delivered / self.drained


async def run_relay(args: argparse.Namespace, folder: Path, secret: str, label: str,
                    source: Path | None) -> RelayRun:
    """One relay (this checkout's, or `source`'s) with its own sink: warm up, then the load,
    then wait until everything accepted reached the sink."""
    port, sink_port = free_port(), free_port()
    # the idle sessions all come from 127.0.0.1; a --compare checkout (no idle sessions)
    # may predate this setting
    per_address = "max_connections_per_address = 5000" if source is None else ""
    (folder / "relay.toml").write_text(CONFIG.format(port=port, sink_port=sink_port, per_address=per_address,
                                                     upstream_connections=args.upstream_connections))
    for stale in folder.glob("spool.db*"):
        stale.unlink()
    env = {**os.environ, "RELAY_LOG_LEVEL": "WARNING"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    count_file = folder / "sink.count"
    count_file.unlink(missing_ok=True)
    procs = [
        subprocess.Popen(pinned(1, [sys.executable, "bench/sink.py", "--port", str(sink_port),
                                    "--count-file", str(count_file)]), stdout=subprocess.DEVNULL),
        subprocess.Popen(pinned(0, [sys.executable, "-m", "relay", "--config", str(folder / "relay.toml"),
                                    "serve"]), env=env, cwd=source or Path.cwd()),
    ]
    relay_pid = procs[1].pid
    try:
        for p in (sink_port, port):
            await wait_port(p)
        cafile = str(folder / "cert.pem")
        warmup = 4 * 50  # imports, caches, sqlite pages, upstream connections
        await run_load("127.0.0.1", port, starttls=True, cafile=cafile, user="bench@example.com",
                       password=secret, connections=4, messages=warmup // 4, size=args.size,
                       sender="bench@example.com")
        deadline = time.monotonic() + 30
        while sink_count(count_file)[0] < warmup and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        delivered_before, _, _ = sink_count(count_file)
        profiler = None
        if args.profile and source is None:  # py-spy samples the relay during the measured run
            profiler = subprocess.Popen(["py-spy", "record", "--pid", str(relay_pid), "--format", "raw",
                                         "--rate", "250", "--nonblocking", "-o", args.profile],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.sleep(1.0)
        cpu_before = _cpu_seconds(relay_pid)
        drain_start = time.perf_counter()
        accepted = await run_load("127.0.0.1", port, starttls=True, cafile=cafile, user="bench@example.com",
                                  password=secret, connections=args.connections, messages=args.messages,
                                  size=args.size, sender="bench@example.com")
        cpu = _cpu_seconds(relay_pid) - cpu_before
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(30)
        deadline = time.monotonic() + 60
        while sink_count(count_file)[0] - delivered_before < accepted.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        drained = time.perf_counter() - drain_start
        left = subprocess.run([sys.executable, "-m", "relay", "--config", str(folder / "relay.toml"),
                               "queue", "list", "--json"], capture_output=True, text=True, check=True,
                              env=env, cwd=source or Path.cwd())
        delivered, opened, peak = sink_count(count_file)
        run = RelayRun(label, accepted, cpu, delivered - delivered_before, drained, peak, opened,
                       len(json.loads(left.stdout)))
        if source is None:
            run.auth = await auth_round_trips("127.0.0.1", port, cafile=cafile, user="bench@example.com",
                                              password=secret, samples=args.auth_samples)
            base_rss = rss_kib(relay_pid)
            sessions = await idle_sessions("127.0.0.1", port, cafile=cafile, user="bench@example.com",
                                           password=secret, count=args.idle)
            await asyncio.sleep(0.5)
            run.rss = (base_rss, rss_kib(relay_pid))
            for client in sessions:
                client.close()
        return run
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def bench(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {1})
    folder = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    direct_port = free_port()
    generate_self_signed("localhost", folder / "cert.pem", folder / "key.pem")
    store = await KeyStore.open(folder / "keystore.db", folder / "pepper", create=True)
    await store.add_mailbox("bench@example.com", workspace="bench", actor="bench")
    _, secret = await store.create_key(mailbox="bench@example.com", name="bench", actor="bench")
    await store.close()
    direct_sink = subprocess.Popen(pinned(1, [sys.executable, "bench/sink.py", "--port", str(direct_port)]),
                                   stdout=subprocess.DEVNULL)
    try:
        await wait_port(direct_port)
        runs = [await run_relay(args, folder, secret, "relay (this checkout)", None)]
        if args.compare:
            runs.append(await run_relay(args, folder, secret, f"relay ({args.compare})", Path(args.compare)))
        direct = await run_load("127.0.0.1", direct_port, starttls=False, cafile=None, user=None,
                                password=None, connections=args.connections, messages=args.messages,
                                size=args.size, sender="bench@example.com")
    finally:
        direct_sink.terminate()
        direct_sink.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    print()
    print(f"bench/submission.py: {args.connections} connections x {args.messages} messages of "
          f"{args.size} B; relay on core 0, load generator and sinks on core 1")
    print(summary("sink directly (plain SMTP)", direct))
    for run in runs:
        print()
        print(summary(run.label + ", accepted", run.accepted))
        print(f"{'  ratio relay / direct':34} {run.accepted.rate / direct.rate:8.2f}x throughput   "
              f"p99 {run.accepted.pct(0.99) / direct.pct(0.99):.2f}x")
        print(f"{'  relay CPU per accepted message':34} {run.cpu / run.accepted.sent * 1e6:8.0f} µs "
              f"(accept + deliver, one core)")
        print(f"{'  delivered to the upstream sink':34} {run.delivered:8d} of {run.accepted.sent} "
              f"in {run.drained:.2f} s: {run.delivered_rate:.0f} msg/s end to end = "
              f"{run.delivered_rate / run.accepted.rate:.0%} of the accepted rate, on at most {run.peak} "
              f"upstream connections ({run.opened} opened in all)")
        print(f"{'  queue after the load':34} {run.queue_left:8d} messages left (relay queue list)")
    main_run = runs[0]
    auth = main_run.auth
    base_rss, idle_rss = main_run.rss
    print()
    print(f"{'AUTH PLAIN round trip':34} median {statistics.median(auth) * 1000:.3f} ms   "
          f"p99 {sorted(auth)[int(0.99 * len(auth))] * 1000:.3f} ms   ({len(auth)} samples)")
    print(f"{'RSS per idle authenticated session':34} {(idle_rss - base_rss) / args.idle:8.1f} KiB   "
          f"({args.idle} sessions: {base_rss} KiB -> {idle_rss} KiB)")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--upstream-connections", type=int, default=20)  # the relay's default
    parser.add_argument("--auth-samples", type=int, default=200)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--profile", metavar="PATH", help="write py-spy collapsed stacks of the relay here")
    parser.add_argument("--compare", metavar="PATH", help="also measure the relay of this checkout")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
