"""Big messages and heavy headers: the relay's memory and its event loop under them.

    .venv/bin/python bench/big_messages.py [--size-mib 25] [--concurrent 10] [--ten-mib-runs 5]

Starts the real relay (pinned to core 0) and a sink (core 1), as bench/submission.py does,
and prints:
  * peak RSS growth (VmHWM) of the relay for one, then N concurrent, 25 MiB messages,
    accepted and delivered to the sink, as a multiple of the message size;
  * MAIL..250 time of a 10 MiB message through the relay (STARTTLS, AUTH) beside the same
    message sent straight to the sink (plain SMTP), median of several runs;
  * the NOOP round trip of a bystander session while another sends the worst header block
    the relay accepts (max_header_size of one-byte fields), and the 552 refusals of one
    just over it;
  * the NOOP round trip of a bystander while a 25 MiB message streams in.
Each relay run is a fresh process, so each peak is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiosmtplib  # noqa: E402
from submission import CONFIG, free_port, pinned, sink_count, wait_port  # noqa: E402

from keystore.store import KeyStore  # noqa: E402
from relay.tlsconf import generate_self_signed  # noqa: E402

SENDER = "bench@example.com"
MIB = 1 << 20
HEADER_LIMIT = 102_400


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def message(size: int, tag: str) -> bytes:
    head = f"From: {SENDER}\r\nTo: rcpt@example.net\r\nSubject: {tag}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


class Relay:
    """A relay process and its sink, in a fresh folder each time."""

    def __init__(self, folder: Path, secret: str) -> None:
        self.folder, self.secret = folder, secret
        self.port, self.sink_port = free_port(), free_port()
        self.count_file = folder / "sink.count"

    async def __aenter__(self) -> Relay:
        config = CONFIG.format(port=self.port, sink_port=self.sink_port, upstream_connections=20,
                               per_address="max_connections_per_address = 100")
        config = config.replace("rate_per_minute = 0", "rate_per_minute = 0\nmax_message_size = 31457280")
        (self.folder / "relay.toml").write_text(config)
        for stale in self.folder.glob("spool.db*"):
            stale.unlink()
        self.count_file.unlink(missing_ok=True)
        env = {**os.environ, "RELAY_LOG_LEVEL": "WARNING"}
        self.procs = [
            subprocess.Popen(pinned(1, [sys.executable, "bench/sink.py", "--port", str(self.sink_port),
                                        "--count-file", str(self.count_file)]), stdout=subprocess.DEVNULL),
            subprocess.Popen(pinned(0, [sys.executable, "-m", "relay", "--config",
                                        str(self.folder / "relay.toml"), "serve"]), env=env),
        ]
        for port in (self.sink_port, self.port):
            await wait_port(port)
        await self.send([message(4096, "warm-up")])
        await self.delivered(1)
        return self

    async def __aexit__(self, *exc) -> None:
        for proc in reversed(self.procs):  # the relay first, so it sees no upstream vanish
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)

    @property
    def pid(self) -> int:
        return self.procs[1].pid

    async def client(self) -> aiosmtplib.SMTP:
        tls = ssl.create_default_context(cafile=str(self.folder / "cert.pem"))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=True, tls_context=tls,
                                 timeout=120)
        await client.connect()
        await client.login(SENDER, self.secret)
        return client

    async def send(self, messages: list[bytes]) -> list[float]:
        """Each message on its own session at once; MAIL..250 seconds of each."""
        async def one(body: bytes) -> float:
            client = await self.client()
            started = time.perf_counter()
            await client.sendmail(SENDER, ["rcpt@example.net"], body)
            took = time.perf_counter() - started
            await client.quit()
            return took

        return list(await asyncio.gather(*(one(m) for m in messages)))

    async def delivered(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while sink_count(self.count_file)[0] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sink_count(self.count_file)[0]} of {count} delivered")
            await asyncio.sleep(0.05)


async def direct_send(port: int, body: bytes) -> float:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=120)
    await client.connect()
    started = time.perf_counter()
    await client.sendmail(SENDER, ["rcpt@example.net"], body)
    took = time.perf_counter() - started
    await client.quit()
    return took


async def send_elsewhere(relay: Relay, size: int) -> None:
    """Send one message of `size` bytes from another process: building and sending it
    costs the client enough CPU to stall this process's own NOOP timing."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--send-one", str(size), "--port", str(relay.port),
        "--cafile", str(relay.folder / "cert.pem"), "--secret", relay.secret)
    if await proc.wait() != 0:
        raise RuntimeError("the sending process failed")


async def send_one(args: argparse.Namespace) -> None:
    tls = ssl.create_default_context(cafile=args.cafile)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=args.port, start_tls=True, tls_context=tls,
                             timeout=120)
    await client.connect()
    await client.login(SENDER, args.secret)
    await client.sendmail(SENDER, ["rcpt@example.net"], message(args.send_one, "elsewhere"))
    await client.quit()


async def bystander_noops(relay: Relay, during) -> list[float]:
    """NOOP round trips of an idle authenticated session while `during` runs."""
    client = await relay.client()
    times: list[float] = []
    task = asyncio.ensure_future(during)
    while not task.done():
        started = time.perf_counter()
        await client.noop()
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.002)
    task.result()
    await client.quit()
    return times


def many_fields(size: int) -> bytes:
    """A header block of `size` bytes in 6-byte fields: the most fields that fit."""
    return f"From: {SENDER}\r\n".encode() + b"A: b\r\n" * ((size - 40) // 6)


def many_senders(size: int) -> bytes:
    """A From: field of `size` bytes listing our own address again and again (folded):
    every one is parsed and checked against the key's mailbox."""
    line = f" {SENDER},".encode()
    per_line = 70 // len(line)
    lines = (size - 40) // (len(line) * per_line + 2)
    folded = b"\r\n".join([line * per_line] * lines)
    return b"From:" + folded + f" {SENDER}\r\n".encode()


async def raw_header_message(relay: Relay, header: bytes) -> str:
    """Send a message with this header block; returns the end-of-data reply."""
    client = await relay.client()
    await client.mail(SENDER)
    await client.rcpt("rcpt@example.net")
    body = header + b"\r\nbody\r\n"
    try:
        reply = await client.data(body)
        text = f"{reply.code} {reply.message}"
    except aiosmtplib.SMTPDataError as exc:
        text = f"{exc.code} {exc.message}"
    await client.quit()
    return text


def report_latency(label: str, times: list[float]) -> None:
    ordered = sorted(times)
    print(f"{label:52} NOOP median {statistics.median(ordered) * 1000:6.2f} ms   "
          f"max {ordered[-1] * 1000:6.2f} ms   ({len(times)} NOOPs)")


async def bench(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    folder = Path(tempfile.mkdtemp(prefix="relay-big-"))
    generate_self_signed("localhost", folder / "cert.pem", folder / "key.pem")
    store = await KeyStore.open(folder / "keystore.db", folder / "pepper", create=True)
    await store.add_mailbox(SENDER, workspace="bench", actor="bench")
    _, secret = await store.create_key(mailbox=SENDER, name="bench", actor="bench")
    await store.close()
    size = args.size_mib * MIB
    big = message(size, "big")
    print(f"bench/big_messages.py: relay on core 0, sink and clients on core 1; {args.size_mib} MiB = "
          f"{len(big)} B per big message")

    for count in (1, args.concurrent):
        async with Relay(folder, secret) as relay:
            before = peak_kib(relay.pid)
            await relay.send([big] * count)
            await relay.delivered(1 + count)
            after = peak_kib(relay.pid)
        grown = (after - before) * 1024
        print(f"{f'peak RSS, {count} x {args.size_mib} MiB at once':52} +{grown / MIB:7.1f} MiB "
              f"({before // 1024} -> {after // 1024} MiB) = {grown / len(big):.2f}x one message")

    ten = message(10 * MIB, "ten")
    direct_port = free_port()
    direct_sink = subprocess.Popen(pinned(1, [sys.executable, "bench/sink.py", "--port", str(direct_port)]),
                                   stdout=subprocess.DEVNULL)
    try:
        await wait_port(direct_port)
        async with Relay(folder, secret) as relay:
            through, direct = [], []
            for _ in range(args.ten_mib_runs):
                through += await relay.send([ten])
                direct.append(await direct_send(direct_port, ten))
            await relay.delivered(1 + args.ten_mib_runs)
            print(f"{'10 MiB MAIL..250, through the relay':52} median {statistics.median(through):6.3f} s")
            print(f"{'10 MiB MAIL..250, straight to the sink':52} median {statistics.median(direct):6.3f} s"
                  f"   relay / direct {statistics.median(through) / statistics.median(direct):.2f}x")

            report_latency("bystander, idle relay", await bystander_noops(relay, asyncio.sleep(1)))
            for label, build in (("6-byte header fields", many_fields), ("addresses in From:", many_senders)):
                replies = []

                async def worst_headers(build=build, replies=replies) -> None:
                    for _ in range(5):
                        replies.append(await raw_header_message(relay, build(HEADER_LIMIT)))
                        replies.append(await raw_header_message(relay, build(HEADER_LIMIT + 1024)))

                report_latency(f"bystander, 100 KiB of {label} x 5, +5 over",
                               await bystander_noops(relay, worst_headers()))
                print(f"{'  replies':52} {sorted({r[:13] + '...' for r in replies})}")
            report_latency(f"bystander, one {args.size_mib} MiB message arriving",
                           await bystander_noops(relay, send_elsewhere(relay, size)))
    finally:
        direct_sink.terminate()
        direct_sink.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=25)
    parser.add_argument("--concurrent", type=int, default=10)
    parser.add_argument("--ten-mib-runs", type=int, default=5)
    parser.add_argument("--send-one", type=int, help=argparse.SUPPRESS)  # the sending process
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cafile", help=argparse.SUPPRESS)
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(send_one(args) if args.send_one else bench(args))


if __name__ == "__main__":
    main()
