"""keystore/pg.py, the plumbing every PostgreSQL backend shares: the SQL dialect
translation, URLs in logs, and migrations that several relays starting at once apply once."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from keystore import pg


def test_sqlite_style_sql_becomes_postgresql_style():
    assert pg.to_pg("SELECT a FROM t WHERE b = ? AND c LIKE '%x?%'") == \
        "SELECT a FROM t WHERE b = %s AND c LIKE '%%x?%%'"
    assert pg.to_pg("SELECT group_concat(a.address, ' ') FROM alias a WHERE x % 2 = ?") == \
        "SELECT string_agg(a.address, ' ') FROM alias a WHERE x %% 2 = %s"


def test_a_password_never_reaches_a_log_line():
    assert pg.redact("postgresql://relay:s3cret@db.example:5433/keys") == \
        "postgresql://relay:***@db.example:5433/keys"
    assert pg.redact("postgresql://relay@db/keys") == "postgresql://relay@db/keys"
    assert pg.is_postgres_url("postgres://x/y") and not pg.is_postgres_url("/var/lib/keystore.db")


async def test_an_unreachable_server_is_named_without_its_password(postgres_server):
    url = f"postgresql://nobody:hunter2@127.0.0.1:{postgres_server.port}/no_such_database"
    with pytest.raises(psycopg.OperationalError) as caught:
        await pg.open_pool(url, name="test", timeout=2)
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value) and "no_such_database" in str(caught.value)


async def test_relays_starting_at_once_migrate_once_and_newer_tables_are_refused(pg_url):
    migrations = ["CREATE TABLE one (x int); INSERT INTO one VALUES (1)",
                  "INSERT INTO one VALUES (2)"]
    pools = [await pg.open_pool(pg_url, name=f"n{i}") for i in range(4)]
    try:
        versions = await asyncio.gather(*(pg.migrate(p, "thing", migrations) for p in pools))
        assert versions == [2, 2, 2, 2]
        async with pools[0].connection() as conn:
            rows = await (await conn.execute("SELECT x FROM one ORDER BY x")).fetchall()
        assert rows == [(1,), (2,)]
        assert await pg.migrate(pools[0], "thing", migrations) == 2
        with pytest.raises(psycopg.DataError, match="newer than this relay knows"):
            await pg.migrate(pools[0], "thing", migrations[:1])
        assert await pg.migrate(pools[0], "other", ["CREATE TABLE two (y int)"]) == 1
    finally:
        for p in pools:
            await p.close()


async def test_connections_keep_alive_on_both_sides_and_keep_the_operators_options(pg_url):
    """A database host that vanishes without a reset is noticed in seconds: the server
    side's keepalives are session settings (so a dead node's session, and its lock on its
    node name, is dropped), and an `options` the operator put in the URL still applies."""
    url = f"{pg_url}?options=-c%20statement_timeout%3D4321"
    pool = await pg.open_pool(url, name="test")
    try:
        async with pool.connection() as conn:
            idle = await (await conn.execute("SHOW tcp_keepalives_idle")).fetchone()
            own = await (await conn.execute("SHOW statement_timeout")).fetchone()
            info = conn.info.get_parameters()
        assert idle == ("10s",) or idle == ("10",)
        assert own == ("4321ms",)
        assert info.get("keepalives_idle") == "10"
    finally:
        await pool.close()
