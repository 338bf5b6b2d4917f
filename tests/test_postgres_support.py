"""The suite's PostgreSQL (tests/support/postgres.py, for issue 12's backends) starts from
Debian's package as `.ci/run` installs it, keeps each test's database apart, and leaves
nothing behind: no process, no folder, no port."""

from __future__ import annotations

import socket

import pytest

from tests.support.postgres import find_bin, running_postgres

pytestmark = pytest.mark.skipif(find_bin() is None,
                                reason="PostgreSQL is not installed (.ci/run installs it)")


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_throwaway_server_answers_and_is_gone_after():
    with running_postgres() as server:
        assert server.psql("SELECT 1 + 1") == "2"
        assert int(server.psql("SHOW server_version_num")) >= 150000
        server.create_database("keystore_one")
        server.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)", "keystore_one")
        server.create_database("keystore_two")
        assert server.psql("SELECT count(*) FROM pg_tables WHERE tablename = 't'", "keystore_two") == "0"
        assert server.psql("SELECT x FROM t", "keystore_one") == "7"
        assert server.psql("SHOW listen_addresses") == "127.0.0.1"
        folder, port = server.folder, server.port
        assert port_open(port)
    assert not folder.exists()
    assert not port_open(port)
