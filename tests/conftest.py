"""Fixtures: a real sink, a real relay on ephemeral loopback ports with real TLS, and a
fresh sqlite keystore and spool in tmp_path for every test."""

from __future__ import annotations

import contextlib
import uuid

import pytest

from keystore.opening import open_keystore
from relay.app import Relay, loop_factory
from relay.config import load_config
from tests.support.keystores import BACKENDS, KeystorePlace
from tests.support.postgres import find_bin, running_postgres
from tests.support.relayrun import Harness, write_config
from tests.support.sink import Sink


def pytest_asyncio_loop_factories(config, item):
    """Tests run on the event loop the relay runs on in production (relay.app)."""
    return {"relay-loop": loop_factory()}


@contextlib.asynccontextmanager
async def running_relay(folder, sink, *, edit=None, **config_parts):
    """`edit(text)`: a change write_config's parts cannot make (another listener line)."""
    path = write_config(folder, sink.port, **config_parts)
    if edit is not None:
        path.write_text(edit(path.read_text()))
    config = load_config(path)
    ks = config.keystore
    store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file, create=True)
    await store.close()
    relay = Relay(config)
    try:
        await relay.start()
        yield Harness(folder, relay, sink)
    finally:
        await relay.stop(grace=0.5)


@pytest.fixture
async def sink():
    async with Sink() as running:
        yield running


@pytest.fixture
def relay_with(tmp_path, sink):
    """`async with relay_with(server='max_recipients = 2') as h:` for per-test config."""
    return lambda **parts: running_relay(tmp_path, sink, **parts)


@pytest.fixture
async def h(tmp_path, sink):
    async with running_relay(tmp_path, sink) as harness:
        yield harness


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL per test worker (tests/support/postgres.py); tests keep apart by
    taking a database each (`pg_url`). Skipped only where the package is missing: .ci/run
    installs it, so CI always runs these."""
    if find_bin() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    with running_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server) -> str:
    """The URL of a fresh, empty database for this test."""
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=BACKENDS)
def keystore_place(request, tmp_path) -> KeystorePlace:
    """The test runs twice: its keystore a sqlite file in tmp_path, then a fresh PostgreSQL
    database (tests/support/keystores.py)."""
    if request.param == "sqlite":
        return KeystorePlace(tmp_path)
    return KeystorePlace(tmp_path, request.getfixturevalue("pg_url"))
