"""Scale-out benchmark (issue 12): one relay against two on one PostgreSQL, side by side, in one run.

    .venv/bin/python bench/cluster.py [--connections 20] [--messages 100] [--size 4096]

Starts a throwaway PostgreSQL (Debian's package, durable: fsync and synchronous commit
on, with pg_stat_statements) and one counting sink, then runs the same load of
authenticated STARTTLS sessions (bench/loadgen.py) through

  1. one relay on sqlite (the embedded default), pinned to core 0;
  2. one relay on PostgreSQL (keystore, limits and queue), pinned to core 0;
  3. two relays on that PostgreSQL, pinned to cores 0 and 1, the sessions split between
     them as a TCP load balancer would.

For each: messages accepted per second, delivered end to end (every message reaches the
sink), the relays' CPU per message, the PostgreSQL server's CPU per message, and what the
database did per accepted message: statements (pg_stat_statements calls, the relay's
own; each is one round trip, or part of one pipelined transaction) and commits.

The load generator, the sink and PostgreSQL are not pinned: on a two-core machine they
share the cores with the relays, so "two relays" measures whether the work spreads,
not what a second machine would add. The figures say so next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadResult, run_load  # noqa: E402
from submission import free_port, pinned, sink_count, wait_port  # noqa: E402

from keystore.opening import open_keystore  # noqa: E402
from relay.tlsconf import generate_self_signed  # noqa: E402
from tests.support.postgres import running_postgres  # noqa: E402

CONFIG = """
[server]
hostname = "localhost"
submission = ["127.0.0.1:{port}"]
max_connections = 5000
rate_per_minute = 1000000  # on: each message checks its key's rate (in PostgreSQL when shared)

[tls]
cert = "../cert.pem"
key = "../key.pem"

[auth]
max_failures = 1000

[keystore]
{keystore}
pepper_file = "../pepper"

[queue]
path = "spool.db"
{queue}

[cluster]
node = "{node}"

[routing]
default = "sink"

[[upstream]]
name = "sink"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
max_connections = 20
"""

ADDRESS = "bench@example.com"


@dataclass
class Run:
    label: str
    accepted: LoadResult
    delivered: int
    drained: float
    relay_cpu: float
    pg_cpu: float
    statements: int
    commits: int
    top: list[str] = field(default_factory=list)

    def line(self) -> str:
        n = self.accepted.sent
        pg = (f"PostgreSQL CPU {self.pg_cpu / n * 1e6:5.0f} µs/msg, {self.statements / n:4.1f} statements "
              f"and {self.commits / n:4.1f} commits per message") if self.statements else "no database server"
        rate, p50, p99 = self.accepted.rate, self.accepted.pct(0.5), self.accepted.pct(0.99)
        return (f"{self.label:28} {rate:6.0f} msg/s accepted (p50 {p50:5.1f} ms, p99 {p99:6.1f} ms), "
                f"{self.delivered / self.drained:6.0f} msg/s end to end; "
                f"relay CPU {self.relay_cpu / n * 1e6:5.0f} µs/msg; {pg}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu(folder: Path) -> float:
    """CPU seconds of every process of the server (the postmaster and its backends, the
    ones that exited included: a parent's cutime/cstime has them)."""
    pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    children = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                children += int(stat[11]) + int(stat[12])
    return (own + children) / os.sysconf("SC_CLK_TCK")


def top_statements(server, database: str, messages: int, count: int) -> list[str]:
    """The relays' most frequent statements since the last reset, per accepted message."""
    rows = server.psql(
        "SELECT s.calls, regexp_replace(left(s.query, 100), '\\s+', ' ', 'g') FROM pg_stat_statements s "
        f"JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{database}' "
        f"AND s.query NOT ILIKE '%pg_stat%' ORDER BY s.calls DESC LIMIT {count}", database)
    lines = []
    for row in rows.splitlines():
        calls, _, query = row.partition("|")
        lines.append(f"    {int(calls) / messages:5.2f}  {query}")
    return lines


def database_work(server, database: str) -> tuple[int, int]:
    """(statements the relays ran, commits) so far in `database`."""
    calls = server.psql("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d "
                        f"ON d.oid = s.dbid WHERE d.datname = '{database}' "
                        "AND query NOT ILIKE '%pg_stat%'", database)
    commits = server.psql(f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'", database)
    return int(calls), int(commits)


async def scenario(args: argparse.Namespace, root: Path, server, url: str | None, secret: str,
                   cores: list[int], sink_port: int, count_file: Path, label: str) -> Run:
    procs, ports = [], []
    for index, core in enumerate(cores):
        folder = root / f"{label.split()[0]}-{index}-{'pg' if url else 'sqlite'}"
        folder.mkdir()
        port = free_port()
        ports.append(port)
        keystore = f'url = "{url}"' if url else 'path = "../keystore.db"'
        queue = f'url = "{url}"' if url else ""
        (folder / "relay.toml").write_text(CONFIG.format(port=port, keystore=keystore, queue=queue,
                                                         node=f"node{index}", sink_port=sink_port))
        env = {**os.environ, "RELAY_LOG_LEVEL": "WARNING"}
        procs.append(subprocess.Popen(pinned(core, [sys.executable, "-m", "relay", "--config",
                                                    str(folder / "relay.toml"), "serve"]), env=env))
    try:
        for port in ports:
            await wait_port(port)
        cafile = str(root / "cert.pem")
        share = max(1, args.connections // len(ports))

        async def load(messages: int, connections: int) -> LoadResult:
            results = await asyncio.gather(*[
                run_load("127.0.0.1", port, starttls=True, cafile=cafile, user=ADDRESS, password=secret,
                         connections=connections, messages=messages, size=args.size, sender=ADDRESS)
                for port in ports])
            return LoadResult(sum(r.sent for r in results), max(r.elapsed for r in results),
                              [t for r in results for t in r.latencies])

        before, _, _ = sink_count(count_file)
        warm = await load(25, 2)  # imports, caches, pools, upstream connections
        deadline = time.monotonic() + 60
        while sink_count(count_file)[0] < before + warm.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        delivered_before, _, _ = sink_count(count_file)
        if url:
            server.psql("SELECT pg_stat_statements_reset()", "bench")
        work_before = database_work(server, "bench") if url else (0, 0)
        pg_before = postgres_cpu(server.folder)
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        started = time.perf_counter()
        accepted = await load(args.messages, share)
        deadline = time.monotonic() + 120
        while sink_count(count_file)[0] - delivered_before < accepted.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        drained = time.perf_counter() - started
        relay_cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        pg_cpu = postgres_cpu(server.folder) - pg_before
        work_after = database_work(server, "bench") if url else (0, 0)
        delivered = sink_count(count_file)[0] - delivered_before
        run = Run(label, accepted, delivered, drained, relay_cpu, pg_cpu if url else 0.0,
                  work_after[0] - work_before[0], work_after[1] - work_before[1])
        if url and args.top:
            run.top = top_statements(server, "bench", accepted.sent, args.top)
        return run
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15)


async def add_sender(store) -> str:
    await store.add_mailbox(ADDRESS, workspace="bench", actor="bench")
    _, secret = await store.create_key(mailbox=ADDRESS, name="bench", actor="bench")
    await store.close()
    return secret


async def bench(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="relay-cluster-bench-"))
    generate_self_signed("localhost", root / "cert.pem", root / "key.pem")
    sink_port = free_port()
    count_file = root / "sink.count"
    sink = subprocess.Popen([sys.executable, "bench/sink.py", "--port", str(sink_port),
                             "--count-file", str(count_file)], stdout=subprocess.DEVNULL)
    options = "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
    try:
        with running_postgres(durable=True, options=options) as server:
            url = server.create_database("bench")
            server.psql("CREATE EXTENSION pg_stat_statements", "bench")
            sqlite_secret = await add_sender(await open_keystore(path=root / "keystore.db",
                                                                 pepper_file=root / "pepper", create=True))
            pg_secret = await add_sender(await open_keystore(url=url, pepper_file=root / "pepper",
                                                             create=True))
            await wait_port(sink_port)
            runs = [
                await scenario(args, root, server, None, sqlite_secret, [0], sink_port, count_file,
                               "1 relay, sqlite"),
                await scenario(args, root, server, url, pg_secret, [0], sink_port, count_file,
                               "1 relay, PostgreSQL"),
                await scenario(args, root, server, url, pg_secret, [0, 1], sink_port, count_file,
                               "2 relays, PostgreSQL"),
            ]
            version = server.psql("SHOW server_version")
    finally:
        sink.terminate()
        sink.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(f"bench/cluster.py: {args.connections} STARTTLS sessions x {args.messages} messages of "
          f"{args.size} B "
          f"(split evenly between the relays); PostgreSQL {version.split()[0]} durable (fsync, synchronous "
          f"commit); relays pinned to their cores, the load generator, the sink and PostgreSQL not pinned "
          f"({os.cpu_count()} cores in all)")
    for run in runs:
        print(run.line())
    for run in runs:
        if run.top:
            print(f"{run.label}: statements per accepted message (pg_stat_statements calls / messages)")
            print("\n".join(run.top))
    one, two = runs[1], runs[2]
    print(f"{'two relays / one (PostgreSQL)':28} {two.accepted.rate / one.accepted.rate:6.2f}x accepted, "
          f"{(two.delivered / two.drained) / (one.delivered / one.drained):.2f}x end to end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--top", type=int, default=0, help="list the N most frequent statements")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
