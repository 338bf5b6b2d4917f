"""Load generator: N concurrent aiosmtplib sessions, each authenticating once and then
sending messages back to back over its connection (as a CRM or sequencer does).

Used by bench/submission.py; can also be run alone:

    python bench/loadgen.py --port 2587 --starttls --cafile certs/dev.crt \
        --user me@example.com --password rak_... --connections 20 --messages 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ssl
import statistics
import time
from dataclasses import dataclass

import aiosmtplib


@dataclass
class LoadResult:
    sent: int
    elapsed: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def message(size: int, sender: str, n: int) -> bytes:
    head = f"From: {sender}\r\nTo: bench@example.net\r\nSubject: bench {n}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def client_context(cafile: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=cafile) if cafile else None


async def connect(host: str, port: int, *, starttls: bool, cafile: str | None,
                  user: str | None, password: str | None) -> aiosmtplib.SMTP:
    client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=starttls,
                             tls_context=client_context(cafile), timeout=30)
    await client.connect()
    if user:
        await client.login(user, password)
    return client


async def run_load(host: str, port: int, *, starttls: bool, cafile: str | None, user: str | None,
                   password: str | None, connections: int, messages: int, size: int,
                   sender: str) -> LoadResult:
    clients = await asyncio.gather(*[
        connect(host, port, starttls=starttls, cafile=cafile, user=user, password=password)
        for _ in range(connections)
    ])
    latencies: list[float] = []
    body = message(size, sender, 0)

    async def one(client: aiosmtplib.SMTP) -> None:
        for _ in range(messages):
            started = time.perf_counter()
            await client.sendmail(sender, ["bench@example.net"], body)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*[one(c) for c in clients])
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.quit()
    return LoadResult(len(latencies), elapsed, latencies)


async def auth_round_trips(host: str, port: int, *, cafile: str, user: str, password: str,
                           samples: int) -> list[float]:
    """Time AUTH PLAIN → 235 alone, on an already-open STARTTLS session."""
    token = base64.b64encode(f"\0{user}\0{password}".encode())
    times = []
    for _ in range(samples):
        client = aiosmtplib.SMTP(hostname=host, port=port, start_tls=True,
                                 tls_context=client_context(cafile), timeout=30)
        await client.connect()
        await client.ehlo()
        started = time.perf_counter()
        code, _ = await client.execute_command(b"AUTH", b"PLAIN", token)
        times.append(time.perf_counter() - started)
        assert code == 235, code
        await client.quit()
    return times


async def idle_sessions(host: str, port: int, *, cafile: str, user: str, password: str,
                        count: int) -> list[aiosmtplib.SMTP]:
    clients = []
    for _ in range(count):  # one by one: the relay's AUTH budget is per address, not a race
        clients.append(await connect(host, port, starttls=True, cafile=cafile, user=user,
                                     password=password))
    return clients


def summary(label: str, result: LoadResult) -> str:
    return (f"{label:34} {result.rate:8.0f} msg/s   p50 {result.pct(0.5):6.1f} ms   "
            f"p99 {result.pct(0.99):6.1f} ms   ({result.sent} messages)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--cafile")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--sender", default="bench@example.com")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    result = asyncio.run(run_load(
        args.host, args.port, starttls=args.starttls, cafile=args.cafile, user=args.user,
        password=args.password, connections=args.connections, messages=args.messages,
        size=args.size, sender=args.user or args.sender))
    print(summary("load", result))
    print(f"median latency {statistics.median(result.latencies) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
