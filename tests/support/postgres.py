"""A real PostgreSQL for the tests (issue 12): Debian's `postgresql` package, `initdb` and
`pg_ctl` into a temporary folder, listening on a free loopback port and a socket in that
folder, trust authentication for this machine only. Nothing of the system's own clusters
is used or touched.

PostgreSQL refuses to run as root (as CI runs); then the server runs as the `postgres`
user the package creates, in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Postgres", "find_bin", "running_postgres"]


def find_bin() -> Path | None:
    """The newest installed server's bin folder (/usr/lib/postgresql/N/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


@dataclass(frozen=True)
class Postgres:
    bin: Path
    folder: Path
    port: int
    user: str  # the database superuser (the OS user the server runs as)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql; its unaligned, tuples-only output."""
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", self.user, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise AssertionError(f"psql {sql!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """A fresh database for one test; its DSN."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as(user: str | None, command: list[str]) -> list[str]:
    return command if user is None else ["runuser", "-u", user, "--", *command]


@contextlib.contextmanager
def running_postgres(timeout: float = 60.0, *, durable: bool = False,
                     options: str = "") -> Iterator[Postgres]:
    """Start a throwaway server; stop it (fast shutdown) and remove its folder after.
    Tests run it without fsync (nothing there must survive a power cut); a benchmark of
    commit latency asks for `durable` (fsync and synchronous commit on, as in production).
    `options`: more `-c name=value` settings (pg_stat_statements for a bench)."""
    bin_dir = find_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    run_as = "postgres" if os.geteuid() == 0 else None
    user = run_as or pwd.getpwuid(os.geteuid()).pw_name
    folder = Path(tempfile.mkdtemp(prefix="keyrelay-pg-"))
    data = folder / "data"
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    port = _free_port()
    log = folder / "server.log"
    try:
        subprocess.run(_as(run_as, [str(bin_dir / "initdb"), "-D", str(data), "-U", user,
                                    "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]),
                       capture_output=True, text=True, timeout=timeout, check=True)
        settings = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
        if not durable:
            settings += "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        subprocess.run(_as(run_as, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                    "-o", settings + options, "-w", "-t", str(int(timeout)), "start"]),
                       capture_output=True, text=True, timeout=timeout + 10, check=True)
        server = Postgres(bin=bin_dir, folder=folder, port=port, user=user)  # pg_ctl -w: accepting
        yield server
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr or ""
        if log.exists():
            detail += log.read_text()[-2000:]
        raise AssertionError(f"PostgreSQL did not start: {detail}") from exc
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as(run_as, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                        "stop"]), capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)
