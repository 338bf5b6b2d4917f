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

    def factory() -> SMTP:
        handler.connections += 1
        return SMTP(handler, hostname="bench-sink", data_size_limit=None)

    server = await loop.create_server(factory, args.host, args.port)
    print(f"sink listening on {args.host}:{args.port}", flush=True)
    async with server:
        while True:
            await asyncio.sleep(0.1)
            if args.count_file:
                Path(args.count_file).write_text(f"{handler.count} {handler.connections}\n")


if __name__ == "__main__":
    asyncio.run(main())
