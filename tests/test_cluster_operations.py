"""Running relays on PostgreSQL as an operator does (issue 12), through the commands as
processes: a relay started before its database is up, the operator commands while it is
down, and URLs written carelessly (a password in the query string, an unencoded `%`).

What an operator sees is the contract: the exit status systemd acts on (1 is restarted,
2 is not: deploy/relay.service's RestartPreventExitStatus=2), one line on stderr, and never
the password.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from keystore import keys
from tests.conftest import running_relay
from tests.support.postgres import running_postgres
from tests.support.procs import free_port, keystore_cli
from tests.support.relayrun import write_config
from tests.test_keystore_postgres import keystore_url_edit, stop
from tests.test_metrics import fetch, metrics_table

PASSWORD = "pg-s3cret-word"  # the test servers trust loopback: it goes unused


def with_password(url: str, password: str = PASSWORD) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


def node_config(folder: Path, *, keystore_url: str | None = None, queue_url: str | None = None) -> Path:
    """A relay's config in `folder` (its own sqlite keystore and spool unless a url is given)."""
    folder.mkdir(exist_ok=True)
    config = write_config(folder, free_port())
    text = config.read_text()
    if keystore_url is not None:
        text = text.replace('[keystore]\npath = "keystore.db"\n', f'[keystore]\nurl = "{keystore_url}"\n', 1)
    if queue_url is not None:
        text = text.replace("[queue]\n", f'[queue]\nurl = "{queue_url}"\n', 1)
    config.write_text(text)
    return config


async def relay(config: Path, *args: str) -> tuple[int, str, str]:
    """`relay --config CONFIG ARGS...` as a process: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def down_url(postgres_server) -> str:
    """A database on a port where no server listens (one not started yet, or stopped)."""
    return with_password(f"postgresql://{postgres_server.user}@127.0.0.1:{free_port()}/keyrelay")


# ------------------------------------------------------------- the database down


async def test_a_relay_started_before_its_database_exits_1_for_systemd_to_try_again(tmp_path, postgres_server,
                                                                                   pg_url):
    """Connection refused is "not up yet" (exit 1: Restart=on-failure tries again), on the
    keystore's url or the queue's; a database that answers without keystore tables is a
    setup step missing (exit 2: restarting would only loop). One line each, no password."""
    down = down_url(postgres_server)
    keystore_down = node_config(tmp_path / "k", keystore_url=down)
    keys.create_pepper(tmp_path / "k" / "pepper")
    queue_down = node_config(tmp_path / "q", queue_url=down)
    assert keystore_cli(queue_down, "init").returncode == 0
    no_tables = node_config(tmp_path / "t", keystore_url=with_password(pg_url))
    keys.create_pepper(tmp_path / "t" / "pepper")

    runs = await asyncio.gather(*(relay(c, "serve") for c in (keystore_down, queue_down, no_tables)))
    redacted = down.replace(PASSWORD, "***")
    (k_status, _, k_err), (q_status, _, q_err), (t_status, _, t_err) = runs
    assert (k_status, k_err.count("\n")) == (1, 1), k_err
    assert k_err.startswith(f"relay: keystore: {redacted}: ") and "Connection refused" in k_err
    assert (q_status, q_err.count("\n")) == (1, 1), q_err
    assert q_err.startswith(f"relay: [queue] url: {redacted}: ") and "Connection refused" in q_err
    assert (t_status, t_err) == (2, f"relay: keystore: {with_password(pg_url, '***')}: no keystore "
                                    "tables in this database (run `keystore init`)\n")
    assert PASSWORD not in k_err + q_err + t_err


async def test_status_and_queue_commands_on_a_database_that_is_down_say_so_in_one_line(tmp_path,
                                                                                      postgres_server):
    down = down_url(postgres_server)
    config = node_config(tmp_path, queue_url=down)
    runs = await asyncio.gather(relay(config, "status"), relay(config, "queue", "list"),
                                relay(config, "check-config"))
    redacted = down.replace(PASSWORD, "***")
    for status, _, err in runs[:2]:
        assert (status, err.count("\n")) == (1, 1), err
        assert err.startswith(f"relay: [queue] url: {redacted}: ") and "Connection refused" in err
    status, _, err = runs[2]
    assert status == 1
    assert [line for line in err.splitlines() if "[queue] url" in line] == [
        f"problem: {config}: [queue] url: {redacted}: cannot connect: connection failed: connection to "
        f"server at \"127.0.0.1\", port {down.rsplit(':', 1)[1].split('/')[0]} failed: Connection refused"]
    assert "psycopg" not in err and PASSWORD not in err


# ------------------------------------------------------------- careless URLs


async def test_a_password_in_a_queue_url_is_never_printed_however_the_url_is_written(tmp_path, pg_url):
    """libpq reads a password from the query string too, and quotes the part of a URL it
    cannot read (an unencoded `%`) in its errors: neither reaches check-config's output
    about [queue] url (which connects on its own, without the keystore's pool)."""
    in_query = node_config(tmp_path / "query", queue_url=f"{pg_url}?password={PASSWORD}")
    unencoded = node_config(tmp_path / "percent", queue_url=with_password(pg_url, f"{PASSWORD}%zz"))
    assert keystore_cli(in_query, "init").returncode == 0
    runs = await asyncio.gather(relay(in_query, "check-config"), relay(unencoded, "check-config"))
    (query_status, _, query_err), (percent_status, _, percent_err) = runs
    assert PASSWORD not in query_err + percent_err
    assert query_status == 0 and f"{pg_url}?password=***: queue schema version 0" in query_err
    assert percent_status == 1
    assert f"[queue] url: {with_password(pg_url, '***')}: cannot connect: " in percent_err


# ------------------------------------------------------------- reload


async def test_a_reload_while_the_keystore_database_is_down_applies_unless_a_route_goes(tmp_path, sink,
                                                                                         caplog):
    """The routes a reload checks against the keystore cannot be read while its database
    is down (or on a pooled connection a database restart broke): a reload that removes no
    route cannot orphan one, so it applies (a certbot renewal's new certificate, new limits)
    with a warning; one that removes a route is refused, as the check could not be made."""
    spare = '\n[[upstream]]\nname = "spare"\nhost = "127.0.0.1"\nport = 9\ntls = "none"\n'
    with running_postgres() as server:
        url = server.create_database("keystore")
        async with running_relay(tmp_path, sink, edit=keystore_url_edit(url), server="max_recipients = 5",
                                 upstream_extra=spare) as h:
            stop(server)
            config = tmp_path / "relay.toml"
            config.write_text(config.read_text().replace("max_recipients = 5", "max_recipients = 3"))
            assert await h.relay.reload()
            assert h.relay.config.server.max_recipients == 3
            assert any(r.levelname == "WARNING" and r.getMessage().startswith(
                "reload: the routes keys and mailboxes use were not checked (the keystore does not "
                "answer: ") and "no route was removed" in r.getMessage() for r in caplog.records)

            config.write_text(config.read_text().replace(spare, ""))
            assert not await h.relay.reload()
            assert [u.name for u in h.relay.config.upstream] == ["sink", "spare"]
            refusal = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()][-1]
            assert "'spare' is removed, and whether the keystore routes anything to it cannot be " \
                   "checked now (keystore query failed: " in refusal


# ------------------------------------------------------------- /readyz


async def test_readyz_is_503_while_the_shared_queue_database_is_down(tmp_path, sink):
    """With [queue] url the spool is the database (every 250 waits on its commit): a node
    whose queue database is down answers every message 451, so a load balancer must stop
    sending it clients, even when its keystore (here a sqlite file) is fine."""
    with running_postgres() as server:
        url = with_password(server.create_database("queue"))
        async with running_relay(tmp_path, sink, queue=f'url = "{url}"', upstream_extra=metrics_table()) as h:
            assert await fetch(h, "/readyz") == (200, "application/json", '{"ready": true}\n')
            stop(server)
            status, _, body = await fetch(h, "/readyz")
            assert status == 503, body
            failing = json.loads(body)["failing"]
            assert list(failing) == ["spool"]
            assert failing["spool"].startswith(f"{url.replace(PASSWORD, '***')}: ")
            assert PASSWORD not in body


async def test_a_reload_that_changes_cluster_keeps_the_running_node_name_until_a_restart(tmp_path, sink,
                                                                                        caplog):
    """[cluster] names this node in the queue's claims and in every metric: a reload says
    it waits for the restart, and the running relay keeps its name everywhere meanwhile."""
    async with running_relay(tmp_path, sink, upstream_extra=metrics_table()
                             + '\n[cluster]\nnode = "relay-a"\n') as h:
        config = tmp_path / "relay.toml"
        config.write_text(config.read_text().replace('node = "relay-a"', 'node = "relay-b"\nlease = "30s"'))
        assert await h.relay.reload()
        assert any(r.getMessage() == "reload: [cluster] changed; that takes a restart, the old value stays "
                   "until then" for r in caplog.records)
        _, _, text = await fetch(h, "/metrics")
        assert 'node="relay-a"' in text and 'node="relay-b"' not in text
