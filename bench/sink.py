"""Accept-all SMTP sink for benchmarks: counts messages, keeps none.

    python bench/sink.py --port 2525 [--count-file PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from aiosmtpd.smtp import SMTP


class CountingHandler:
    def __init__(self) -> None:
        self.count = 0
        self.connections = 0
        self.live = 0
        self.peak = 0

    async def handle_DATA(self, server, session, envelope) -> str:
        self.count += 1
        return "250 2.0.0 OK"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-file")
    args = parser.parse_args()
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    handler = CountingHandler()
    loop = asyncio.get_running_loop()

    class CountingSMTP(SMTP):
        def connection_made(self, transport) -> None:
            if self.transport is None:
                handler.connections += 1
                handler.live += 1
                handler.peak = max(handler.peak, handler.live)
            super().connection_made(transport)

        def connection_lost(self, exc) -> None:
            handler.live -= 1
            super().connection_lost(exc)

    def factory() -> SMTP:
        return CountingSMTP(handler, hostname="bench-sink", data_size_limit=None)

    server = await loop.create_server(factory, args.host, args.port)
    print(f"sink listening on {args.host}:{args.port}", flush=True)
    async with server:
        while True:
            await asyncio.sleep(0.1)
            if args.count_file:
                Path(args.count_file).write_text(f"{handler.count} {handler.connections} {handler.peak}\n")


if __name__ == "__main__":
    asyncio.run(main())
