"""Building configs and running the real relay for tests."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from relay.tlsconf import generate_self_signed

BASE_CONFIG = """
[server]
hostname = "relay.test"
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]
{server_extra}

[tls]
cert = "cert.pem"
key = "key.pem"

[auth]
{auth_extra}

[keystore]
path = "keystore.db"
pepper_file = "pepper"

[queue]
path = "{spool}"
retry_schedule = {retry}
{queue_extra}

[routing]
default = "sink"

[[upstream]]
name = "sink"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
timeout = "5s"
{upstream_extra}
"""


QUICK_HEALTH = 'backoff = "0.2s"\nmax_backoff = "0.2s"'


def make_certs(folder: Path) -> Path:
    cert = folder / "cert.pem"
    if not cert.exists():
        generate_self_signed("relay.test", cert, folder / "key.pem")
    return cert


def write_secret(path: Path, text: str) -> None:
    """A secret file (an upstream password) as an operator should make one: 0600 from the
    first byte; the relay refuses one that other users could read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)  # it may have existed with another mode


def write_config(
    folder: Path, sink_port: int, *, server: str = "", auth: str = "", queue: str = "",
    upstream_extra: str = "", retry: str = '["0.3s"]', spool: str = "spool.db",
    upstream_timeout: str = "5s", health: str = QUICK_HEALTH,
) -> Path:
    """`health`: the [provider_health] table's body; by default a backoff shorter than the
    retry schedule, so a test that takes its upstream down for a while finds it probed
    (and back) at the next attempt, as it would without provider health."""
    make_certs(folder)
    path = folder / "relay.toml"
    path.write_text(BASE_CONFIG.format(
        server_extra=server, auth_extra=auth, queue_extra=queue, sink_port=sink_port,
        upstream_extra=upstream_extra, retry=retry, spool=spool,
    ).replace('timeout = "5s"', f'timeout = "{upstream_timeout}"') + f"\n[provider_health]\n{health}\n")
    return path


def client_tls(folder: Path) -> ssl.SSLContext:
    """What a careful client does: verify the relay's certificate and name."""
    return ssl.create_default_context(cafile=str(folder / "cert.pem"))


class Harness:
    """A running relay, its sink and its folder, with the steps a test reads like."""

    def __init__(self, folder: Path, relay, sink) -> None:
        self.folder = folder
        self.relay = relay
        self.sink = sink
        self.tls = client_tls(folder)

    @property
    def config_path(self) -> Path:
        return self.folder / "relay.toml"

    @property
    def port(self) -> int:
        return self.relay.port("submission")

    @property
    def implicit_port(self) -> int:
        return self.relay.port("submissions")

    async def mailbox(self, address: str, *, workspace: str = "default", aliases=()) -> None:
        await self.relay.store.add_mailbox(address, workspace=workspace, aliases=aliases, actor="test")

    async def key(self, mailbox: str | None = None, *, workspace: str | None = None, **kwargs) -> str:
        _, secret = await self.relay.store.create_key(
            mailbox=mailbox, workspace=workspace, name=kwargs.pop("name", "test key"), actor="test",
            **kwargs,
        )
        return secret

    async def client(self, *, implicit: bool = False, source: str | None = None):
        import aiosmtplib

        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.implicit_port if implicit else self.port,
            use_tls=implicit,
            start_tls=not implicit,
            tls_context=self.tls,
            timeout=5,
            source_address=(source, 0) if source else None,
        )
        await client.connect()
        await client.ehlo()  # after STARTTLS the extensions are learnt again
        return client

    async def login(self, address: str, secret: str, **kwargs):
        client = await self.client(**kwargs)
        await client.login(address, secret)
        return client
