"""`relay dev-sink`: a development upstream that writes each message it receives to a
folder, so `make run` shows the whole path without a real provider. Not for production.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP

__all__ = ["run_dev_sink"]


class _FolderHandler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server, session, envelope) -> str:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}.eml"
        header = f"X-Dev-Sink-From: <{envelope.mail_from}>\r\n" + "".join(
            f"X-Dev-Sink-To: <{rcpt}>\r\n" for rcpt in envelope.rcpt_tos
        )
        fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(header.encode() + envelope.original_content)
        print(f"dev-sink: wrote {self.folder / name}", flush=True)
        return "250 2.0.0 OK"


async def run_dev_sink(host: str, port: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handler = _FolderHandler(folder)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="dev-sink", ident="dev-sink"), host, port
    )
    print(f"dev-sink: listening on {host}:{port}, writing to {folder}", flush=True)
    async with server:
        await server.serve_forever()
