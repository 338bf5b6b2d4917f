"""A spool file the relay cannot use, as an operator meets it: `relay serve` and every
`relay queue` command stop with one line on stderr naming the file and what to do, and
exit status 2, which the systemd unit's RestartPreventExitStatus=2 keeps from
restart-looping. A spool that is only busy (another relay on it) stays exit 1."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from keystore.store import KeyStore
from relay.config import load_config
from relay.queue.schema import MIGRATIONS
from tests.support.relayrun import write_config

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "relay.service"


def random_bytes(spool: Path) -> None:
    spool.write_bytes(os.urandom(16384))


def sqlite_without_tables(spool: Path) -> None:
    """A sqlite file at the newest version whose tables are gone (dropped by hand)."""
    with sqlite3.connect(spool) as conn:
        conn.execute("CREATE TABLE notes (x)")
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def sqlite_missing_columns(spool: Path) -> None:
    """The newest version, but tables another program made (or an old backup copied over)."""
    with sqlite3.connect(spool) as conn:
        conn.execute("CREATE TABLE message (id TEXT PRIMARY KEY)")
        conn.execute("CREATE TABLE recipient (message_id TEXT, address TEXT)")
        conn.execute("CREATE TABLE body (message_id TEXT, data BLOB)")
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def broken_first_version(spool: Path) -> None:
    """An unversioned file whose `message` table is not the queue's: the migration fails."""
    with sqlite3.connect(spool) as conn:
        conn.execute("CREATE TABLE message (id TEXT)")


def newer_schema(spool: Path) -> None:
    with sqlite3.connect(spool) as conn:
        conn.execute("PRAGMA user_version = 99")


def a_directory(spool: Path) -> None:
    spool.mkdir()


def truncated_header(spool: Path) -> None:
    """A real spool cut short inside its first page (a failed copy)."""
    with sqlite3.connect(spool) as conn:
        conn.executescript(MIGRATIONS[0])
    spool.write_bytes(spool.read_bytes()[:50])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "random-bytes": random_bytes, "no-tables": sqlite_without_tables,
    "missing-columns": sqlite_missing_columns, "broken-v1": broken_first_version,
    "newer-schema": newer_schema, "directory": a_directory, "truncated": truncated_header,
}


async def relay_folder(folder: Path, damage: Callable[[Path], None]) -> Path:
    config_path = write_config(folder, 2525)
    config = load_config(config_path)
    store = await KeyStore.open(config.keystore.path, config.keystore.pepper_file, create=True)
    await store.close()
    damage(folder / "spool.db")
    return config_path


def relay(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30)


def one_line_exit_2(result: subprocess.CompletedProcess, spool: Path) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"relay: {spool}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_relay_serve_refuses_an_unusable_spool_with_exit_2(tmp_path, damage):
    config = await relay_folder(tmp_path, DAMAGE[damage])
    line = one_line_exit_2(await asyncio.to_thread(relay, config, "serve"), tmp_path / "spool.db")
    assert "spool" in line.removeprefix(f"relay: {tmp_path / 'spool.db'}: ")


@pytest.mark.parametrize("damage", ["random-bytes", "no-tables", "missing-columns", "newer-schema"])
@pytest.mark.parametrize("command", [["queue", "list"], ["queue", "show", "x"], ["queue", "retry", "--all"]],
                         ids=["list", "show", "retry"])
async def test_relay_queue_refuses_an_unusable_spool_with_exit_2(tmp_path, damage, command):
    config = await relay_folder(tmp_path, DAMAGE[damage])
    one_line_exit_2(await asyncio.to_thread(relay, config, *command), tmp_path / "spool.db")


async def test_the_messages_say_what_to_do(tmp_path):
    config = await relay_folder(tmp_path, random_bytes)
    line = one_line_exit_2(await asyncio.to_thread(relay, config, "serve"), tmp_path / "spool.db")
    assert "file is not a database" in line and "restore it from a backup" in line
    (tmp_path / "spool.db").unlink()
    newer_schema(tmp_path / "spool.db")
    line = one_line_exit_2(await asyncio.to_thread(relay, config, "queue", "list"), tmp_path / "spool.db")
    assert "newer than this program" in line and "the relay version that wrote it" in line


async def test_the_files_stay_as_they_were(tmp_path):
    """Nothing is "repaired": the operator decides what happens to a damaged spool."""
    config = await relay_folder(tmp_path, random_bytes)
    before = (tmp_path / "spool.db").read_bytes()
    one_line_exit_2(await asyncio.to_thread(relay, config, "serve"), tmp_path / "spool.db")
    assert (tmp_path / "spool.db").read_bytes() == before


def test_the_systemd_unit_does_not_restart_on_exit_2_and_raises_the_file_limit():
    settings = [line.strip() for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    assert "RestartPreventExitStatus=2" in settings
    assert "LimitNOFILE=65536" in settings
