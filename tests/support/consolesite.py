"""The web console under test: a relay folder (config on fixed SMTP ports, so the console
shows ports a client can use), `keystore serve` as a real process over its keystore,
admin tokens, and an httpx client that logs in as a browser would.

The relay itself runs in the test (`ConsoleSite.relay`), on the same keystore files, so a
key made in the console logs in at the relay and a revocation there refuses the next login.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from keystore.store import KeyStore
from relay.app import Relay
from relay.config import load_config
from tests.support.adminserver import AdminServer, Token, create_token, start_admin_server
from tests.support.procs import free_port
from tests.support.relayrun import client_tls, write_config
from tests.support.sink import Sink

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')
REFUSAL_RE = re.compile(r'id="refusal">([^<]*)<')
MESSAGE = ("From: {sender}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\r\n"
           "sent with a key from the console\r\n")


def csrf_of(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def post_login(client: httpx.Client, secret: str) -> httpx.Response:
    """The login form as a browser sends it: its CSRF cookie and field, and the token."""
    form = client.get("/login")
    return client.post("/login", data={"csrf": csrf_of(form.text), "token": secret})


def session_cookie(reply: httpx.Response) -> list[str]:
    """The attributes of the session cookie a reply sets."""
    (cookie,) = [c for c in reply.headers.get_list("set-cookie") if c.startswith("keystore_session=")]
    return [part.strip() for part in cookie.split(";")]


def refusal_of(html: str) -> str:
    """The text of the page's refusal banner (autoescaped)."""
    match = REFUSAL_RE.search(html)
    assert match, "the page shows no refusal"
    return match.group(1).replace("&#39;", "'").replace("&#34;", '"').replace("&amp;", "&")


@dataclass
class ConsoleSite:
    folder: Path
    submission_port: int
    submissions_port: int
    server: AdminServer | None = None
    tokens: dict[str, Token] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def config(self) -> Path:
        return self.folder / "relay.toml"

    def write_config(self, sink_port: int) -> Path:
        path = write_config(self.folder, sink_port, auth="max_failures = 3")
        text = path.read_text()
        for kind, port in (("submission", self.submission_port), ("submissions", self.submissions_port)):
            text = text.replace(f'{kind} = ["127.0.0.1:0"]', f'{kind} = ["127.0.0.1:{port}"]')
        path.write_text(text + '\n[admin]\nsession_ttl = "1h"\n')
        return path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10)

    @contextlib.contextmanager
    def login(self, token: Token | str) -> Iterator[httpx.Client]:
        """A client holding a console session of `token` (by its role name in `tokens`)."""
        secret = (self.tokens[token] if isinstance(token, str) else token).secret
        with self.client() as client:
            reply = post_login(client, secret)
            assert reply.status_code == 303, reply.text
            yield client

    @contextlib.asynccontextmanager
    async def relay(self, sink: Sink) -> AsyncIterator[Relay]:
        """The relay on this site's ports and keystore, delivering to `sink`."""
        relay = Relay(load_config(self.write_config(sink.port)))
        await relay.start()
        try:
            yield relay
        finally:
            await relay.stop(grace=0.5)

    def send(self, username: str, password: str, *, subject: str = "hello") -> None:
        """Log in on the submission port (STARTTLS, the relay's certificate verified) and
        send one message, as a mail client configured from the console would
        (blocking: run it in a thread beside an in-process relay)."""
        with self.smtp() as client:
            client.login(username, password)
            client.sendmail(username, ["bob@example.net"],
                            MESSAGE.format(sender=username, subject=subject).encode())

    @contextlib.contextmanager
    def smtp(self) -> Iterator[smtplib.SMTP]:
        context: ssl.SSLContext = client_tls(self.folder)
        with smtplib.SMTP("127.0.0.1", self.submission_port, timeout=10) as client:
            client.starttls(context=context)
            yield client

    def try_login(self, username: str, password: str) -> None:
        with self.smtp() as client:
            client.login(username, password)


async def _seed(config: Path) -> None:
    cfg = load_config(config)
    store = await KeyStore.open(cfg.keystore.path, cfg.keystore.pepper_file, create=True)
    try:
        await store.add_mailbox("alice@acme.example", workspace="acme", actor="test")
        await store.add_mailbox("carol@acme.example", workspace="acme", actor="test")
        await store.add_mailbox("dave@other.example", workspace="other", actor="test")
    finally:
        await store.close()


@contextlib.contextmanager
def console_site(folder: Path) -> Iterator[ConsoleSite]:
    """A seeded keystore (workspaces acme: alice@, carol@; other: dave@), tokens owner,
    editor (acme only) and viewer, and `keystore serve` on an ephemeral loopback port."""
    site = ConsoleSite(folder, free_port(), free_port())
    site.write_config(sink_port=9)  # the relay's upstream is set when a test starts one
    asyncio.run(_seed(site.config))
    site.tokens = {
        "owner": create_token(site.config, "ops", "owner"),
        "editor": create_token(site.config, "acme-admin", "editor", "acme"),
        "viewer": create_token(site.config, "auditor", "viewer"),
    }
    site.server = start_admin_server(site.config)
    try:
        yield site
    finally:
        status = site.server.stop()
        assert status == 0, site.server.log.read_text()[-2000:]
