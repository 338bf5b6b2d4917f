"""`relay check-config`: every problem that would stop the relay (or break it later), and
where it would listen, without starting it. No port is bound: a running relay holds them.

    report = check_file(path)                 # the CLI: parse errors become one problem
    problems = await config_problems(config)  # a loaded Config (a reload), nothing printed

Each check goes through the relay's own loader, one item at a time: `server_context` for
the certificate and key, `DkimSigner` for each [[dkim]] key, `make_couriers` for each
[[upstream]], `load_pepper` and `KeyStore.routes_in_use` for the keystore, `cross_check`
for the config's own rules. A loader that stops at its first problem therefore still
yields every problem, and check-config cannot pass what the relay would refuse. On top
come what the relay only meets later: an expired or soon-expiring certificate, one whose
names do not cover [server] hostname (clients that verify it refuse), an upstream CA file
that is not PEM (every delivery would fail its TLS).

The keystore is opened read-only (sqlite's mode=ro; a PostgreSQL keystore is only read):
the relay may be running on it, and a check must not migrate or create anything. Whether
the pepper matches the keystore cannot be told: the keystore stores only HMAC(pepper,
id:secret) per key, nothing derived from the pepper alone, so without a key's secret there
is nothing to compare.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import os
import socket
import sqlite3
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite
from cryptography import x509
from cryptography.x509.oid import NameOID

from keystore.db import BUSY_TIMEOUT_MS
from keystore.http.site import is_loopback
from keystore.keys import PepperError, load_pepper
from keystore.schema import MIGRATIONS
from keystore.sqlitedb import SqliteDatabase
from keystore.store import KeyStore, KeystoreUnavailable
from relay.config import (
    Config,
    ConfigError,
    check_secret_file,
    cross_check,
    parse_config,
    resolve_config_path,
    split_hostport,
)
from relay.delivery.routing import make_couriers
from relay.queue.pgschema import COMPONENT as QUEUE_COMPONENT
from relay.queue.pgschema import MIGRATIONS as QUEUE_MIGRATIONS
from relay.queue.schema import check_tables as check_spool_tables
from relay.queue.schema import migrate as migrate_spool
from relay.signing import DkimSigner
from relay.tlsconf import server_context

if TYPE_CHECKING:
    from keystore.postgresdb import PostgresDatabase

__all__ = ["EXPIRY_WARNING", "Listen", "Report", "check", "check_file", "config_problems", "main"]

EXPIRY_WARNING = datetime.timedelta(days=14)  # certbot renews at 30 days left: 14 means it failed


@dataclass(frozen=True, slots=True)
class Listen:
    """An address the relay would listen on."""

    # "submission" (STARTTLS), "submissions" (implicit TLS), "metrics", or "admin" (`keystore
    # serve`, a process of its own reading the same file)
    kind: str
    host: str
    port: int

    @property
    def label(self) -> str:
        return {"submission": "STARTTLS", "submissions": "implicit TLS"}.get(self.kind, self.kind)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(slots=True)
class Report:
    source: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    listeners: list[Listen] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        """Add a problem, naming the config file first as ConfigErrors do; once only (two
        loaders may stop at the same fault)."""
        text = self._named(text)
        if text not in self.problems:
            self.problems.append(text)

    def warning(self, text: str) -> None:
        text = self._named(text)
        if text not in self.warnings:
            self.warnings.append(text)

    def _named(self, text: str) -> str:
        return text if text.startswith(f"{self.source}:") else f"{self.source}: {text}"

    def as_json(self) -> dict[str, object]:
        return {
            "config": str(self.source),
            "ok": self.ok,
            "problems": self.problems,
            "warnings": self.warnings,
            "listeners": [
                {"kind": item.kind, "host": item.host, "port": item.port} for item in self.listeners
            ],
        }


async def config_problems(config: Config) -> list[str]:
    """Every problem of a loaded config, printing nothing (empty: the relay can use it).
    For a reload: refuse the new config if this is not empty."""
    return (await check(config)).problems


async def check(config: Config) -> Report:
    """Run every check on `config`. The file reads and the DKIM self-signatures run on a
    thread, so a running relay's event loop is not held up by them."""
    report = Report(config.source)
    for text in cross_check(config):
        report.problem(text)
    _check_required(config, report)
    await asyncio.to_thread(_check_files, config, report)
    await _check_keystore(config, report)
    await _check_shared_queue(config, report)
    report.listeners = listeners(config)
    await asyncio.to_thread(_check_listen_hosts, report)
    return report


def _check_listen_hosts(report: Report) -> None:
    """Each address the relay would listen on resolves to one this machine has: bound on
    port 0 for an instant (the configured ports may be the running relay's), so an address
    that is not here, or a name that does not resolve, is found before a start fails on it
    (a reload only says that a listener change waits for the restart)."""
    for item in report.listeners:
        where = {"metrics": "[metrics] listen", "admin": "[admin] listen"}.get(item.kind, "[server] listener")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                item.host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
        except OSError as exc:
            report.problem(f"{where} {item.address!r}: cannot listen on {item.host}: {exc.strerror or exc}")


def check_file(path: str | os.PathLike[str]) -> Report:
    """Load the config at `path` and check it; a file that cannot be read or parsed at all
    is one problem. Every line names the file by its absolute path, as config.source does."""
    source = Path(path).resolve()
    try:
        config = parse_config(source)
    except ConfigError as exc:
        report = Report(source)
        report.problems.append(str(exc))
        return report
    return asyncio.run(check(config))


def listeners(config: Config) -> list[Listen]:
    """What would listen where, as the relay reads the addresses (an empty host: every
    IPv4 address); an address it cannot read is left out (cross_check names it)."""
    configured = [("submission", a) for a in config.server.submission]
    configured += [("submissions", a) for a in config.server.submissions]
    if config.metrics.listen is not None:
        configured.append(("metrics", config.metrics.listen))
    if config.admin.listen is not None:
        configured.append(("admin", config.admin.listen))
    found = []
    for kind, address in configured:
        try:
            found.append(Listen(kind, *split_hostport(address)))
        except ValueError:
            continue
    return found


def _check_required(config: Config, report: Report) -> None:
    """What Relay.start needs besides the sections the config itself requires."""
    for name in ("tls", "queue", "routing"):
        if getattr(config, name) is None:
            if name == "tls" and any(p.endswith("[tls]: required when [server] has listeners")
                                     for p in report.problems):
                continue
            report.problem(f"[{name}]: required to run the relay")
    if config.queue is not None and config.queue.workers is not None:
        report.warning("[queue] workers is no longer used: each [[upstream]] max_connections "
                       "sets how many deliveries run at once on it")


def _check_files(config: Config, report: Report) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if config.tls is not None:
        _check_tls(config, report, now)
    for upstream in config.upstream:
        _check_upstream_files(config, upstream, report)
    _check_dkim(config, report)
    if config.queue is not None:
        _check_spool(config.queue.path, report)


# ------------------------------------------------------------------ TLS


def _check_tls(config: Config, report: Report, now: datetime.datetime) -> None:
    tls = config.tls
    assert tls is not None
    try:
        server_context(tls)
    except ConfigError as exc:
        report.problem(str(exc))
    readable = all(path.is_file() and os.access(path, os.R_OK) for path in (tls.cert, tls.key))
    if readable:
        # server_context stops at a key others can read before trying the pair: try it too
        # (the same message as server_context's when that got that far, so it shows once)
        pair = _pair_problem(tls.cert, tls.key)
        if pair is not None:
            report.problem(pair)
    if not (tls.cert.is_file() and os.access(tls.cert, os.R_OK)):
        return
    try:
        chain = x509.load_pem_x509_certificates(tls.cert.read_bytes())
    except (ValueError, OSError):
        if not any("[tls] cannot load" in p for p in report.problems):
            report.problem(f"[tls] cert: {tls.cert}: not a PEM certificate")
        return
    _check_validity(chain[0], tls.cert, report, now)
    hostname = config.server.hostname
    names = _cert_names(chain[0])
    if not any(_covers(name, hostname) for name in names):
        report.problem(
            f"[tls] cert: {tls.cert}: its names ({', '.join(names) or 'none'}) do not cover "
            f"[server] hostname {hostname!r}; clients that check the name refuse it"
        )


def _pair_problem(cert: Path, key: Path) -> str | None:
    """server_context's pair check and message, for when it stopped before it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return f"[tls] key {key} does not match cert {cert}"
        return f"[tls] cannot load {cert} / {key}: {exc.reason or exc}"
    except OSError:
        return None  # unreadable: server_context said so
    return None


def _check_validity(cert: x509.Certificate, path: Path, report: Report, now: datetime.datetime) -> None:
    not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now >= not_after:
        report.problem(f"[tls] cert: {path}: expired on {_when(not_after)} "
                       f"({(now - not_after).days} days ago); clients refuse it")
    elif now < not_before:
        report.problem(f"[tls] cert: {path}: not valid before {_when(not_before)}")
    elif not_after - now < EXPIRY_WARNING:
        report.warning(f"[tls] cert: {path}: expires on {_when(not_after)} "
                       f"(in {(not_after - now).days} days); renew it")


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses the certificate is for: its subjectAltName, else
    (as clients still do then) its common name."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [*alt.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))]


def _covers(name: str, hostname: str) -> bool:
    """RFC 6125 matching: exact (case-insensitive), or a wildcard as the whole left-most
    label standing for exactly one label; an IP address only equals itself."""
    host = hostname.rstrip(".").lower()
    name = name.rstrip(".").lower()
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(name)
    except ValueError:
        pass
    if name == host:
        return True
    if name.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == name[2:] and name.count(".") >= 2
    return False


# ------------------------------------------------------------ upstreams, DKIM


def _check_upstream_files(config: Config, upstream, report: Report) -> None:
    where = f"[[upstream]] {upstream.name}"
    ok = True
    if upstream.password_file is not None:
        try:  # the rule Relay.start applies (check_secret_files), per upstream
            check_secret_file(upstream.password_file, f"{where} password_file", "password file")
        except ConfigError as exc:
            report.problem(str(exc))
            ok = False
    if ok:  # a missing password file would be said twice otherwise
        try:
            make_couriers(dataclasses.replace(config, upstream=(upstream,)))
        except ConfigError as exc:
            report.problem(str(exc))
    if upstream.ca_file is not None and upstream.kind == "smarthost" and upstream.tls != "none":
        problem = _ca_problem(upstream.ca_file)
        if problem is not None:
            report.problem(f"{where} ca_file: {upstream.ca_file}: {problem}")


def _ca_problem(path: Path) -> str | None:
    """The context every delivery to the smarthost builds (relay/delivery/smarthost.py);
    the relay only builds it at the first delivery, so a bad file is found here first."""
    try:
        ssl.create_default_context(cafile=str(path))
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "not readable by this user"
    except ssl.SSLError as exc:
        return f"no PEM certificate could be read from it ({exc.reason or exc})"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return None


def _check_dkim(config: Config, report: Report) -> None:
    usable = []
    for entry in config.dkim:
        try:
            DkimSigner([entry])
        except ConfigError as exc:
            report.problem(str(exc))
        else:
            usable.append(entry)
    try:  # what only shows together: a domain and selector defined twice
        DkimSigner(usable)
    except ConfigError as exc:
        report.problem(str(exc))


# ------------------------------------------------------------ spool


def _check_spool(path: Path, report: Report) -> None:
    """What the relay's start refuses (exit 2) in an existing spool (a missing one it
    creates): a folder, not a database, a schema newer than this program, or one it cannot
    migrate or that lacks the queue's tables (e.g. [queue] path naming the keystore).
    Read-only: the file's schema, not its data, is migrated on a copy in memory."""
    where = f"[queue] path: {path}"
    if not path.exists():
        return
    if not path.is_file():
        report.problem(f"{where}: not a file")
        return
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            schema = [sql for (sql,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'")]
        finally:
            conn.close()
        copy = sqlite3.connect(":memory:", isolation_level=None)
        try:
            for sql in schema:
                copy.execute(sql)
            copy.execute(f"PRAGMA user_version = {int(version)}")
            migrate_spool(copy)
            check_spool_tables(copy)
        finally:
            copy.close()
    except sqlite3.Error as exc:
        report.problem(f"{where}: the relay cannot use it as its spool: {exc}")


async def _check_shared_queue(config: Config, report: Report) -> None:
    """With [queue] url: the database answers, and its queue tables are ones this program
    can use (none yet is fine: the relay creates them). Read-only; the URL is shown with
    its password left out."""
    url = config.queue.url if config.queue is not None else None
    if not url:
        return
    import psycopg  # only configs with a url need the driver loaded

    from keystore import pg

    where = f"[queue] url: {pg.redact(url)}"
    try:  # one connection, no pool: a pool retries in the background and logs each failure
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=5, autocommit=True)
    except psycopg.Error as exc:  # libpq quotes back a part of the URL it cannot read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        report.problem(f"{where}: cannot connect: {pg.scrub(first, url)}")
        return
    try:
        cur = await conn.execute("SELECT to_regclass('keyrelay_schema') IS NOT NULL")
        version = 0
        if (await cur.fetchone())[0]:
            cur = await conn.execute("SELECT version FROM keyrelay_schema WHERE component = %s",
                                     (QUEUE_COMPONENT,))
            row = await cur.fetchone()
            version = 0 if row is None else int(row[0])
    except psycopg.Error as exc:
        report.problem(f"{where}: cannot read the queue's schema version: {pg.scrub(str(exc), url)}")
        return
    finally:
        await conn.close()
    current = len(QUEUE_MIGRATIONS)
    if version > current:
        report.problem(f"{where}: queue schema version {version} is newer than this program ({current})")
    elif version < current:
        report.warning(f"{where}: queue schema version {version}; the relay brings it to {current} "
                       "when it starts")


# ------------------------------------------------------------ keystore


async def _check_keystore(config: Config, report: Report) -> None:
    ks = config.keystore
    try:
        await asyncio.to_thread(load_pepper, ks.pepper_file)
    except PepperError as exc:
        report.problem(f"[keystore] pepper_file: {exc}")
    if ks.url is not None:
        await _check_postgres_keystore(config, ks.url, report)
        return
    if not ks.path.is_file():
        what = "not a file" if ks.path.exists() else "keystore not found (run `keystore init`)"
        report.problem(f"[keystore] path: {ks.path}: {what}")
        return
    where = f"[keystore] path: {ks.path}"
    try:
        conn = await aiosqlite.connect(f"{ks.path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        report.problem(f"{where}: cannot open read-only: {exc}")
        return
    try:
        await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        ((version,),) = await conn.execute_fetchall("PRAGMA user_version")
        if _schema_usable(report, where, version, len(MIGRATIONS)):
            database = SqliteDatabase(ks.path, conn, conn)
            await _check_routes_in_use(config, KeyStore(database, b"", ks.default_key_limit), report)
    except (sqlite3.Error, KeystoreUnavailable) as exc:
        report.problem(f"{where}: cannot read the keystore: {exc}")
    finally:
        await conn.close()


def _schema_usable(report: Report, where: str, version: int, current: int) -> bool:
    """Report a keystore schema newer (a problem) or older (the relay upgrades it) than this
    program's; True when it is this program's, so its routes can be read."""
    if version > current:
        report.problem(f"{where}: keystore schema version {version} is newer than this program ({current})")
    elif version < current:
        report.warning(f"{where}: keystore schema version {version}; the relay upgrades it to "
                       f"{current} when it starts (routes in it are not checked until then)")
    return version == current


async def _check_postgres_keystore(config: Config, url: str, report: Report) -> None:
    """With [keystore] url: the database answers and holds keystore tables this program can
    use (read only: nothing is created or migrated), and their routes exist here. The URL is
    shown with its password left out."""
    from keystore import pg, pgschema  # only configs with a url need the driver loaded
    from keystore.postgresdb import PostgresDatabase

    where = f"[keystore] url: {pg.redact(url)}"
    try:
        database = await PostgresDatabase.connect(url, max_size=1)
    except KeystoreUnavailable as exc:  # names the URL without its password already
        report.problem(f"[keystore] url: cannot connect: {exc}")
        return
    try:
        version = await database.schema_version()
        if version == 0:
            report.problem(f"{where}: no keystore tables in this database (run `keystore init`)")
        elif _schema_usable(report, where, version, len(pgschema.MIGRATIONS)):
            await _check_routes_in_use(config, KeyStore(database, b"", config.keystore.default_key_limit),
                                       report)
            await _check_pepper_recorded(config.keystore.pepper_file, database, report)
    except KeystoreUnavailable as exc:
        report.problem(f"{where}: cannot read the keystore: {exc}")
    finally:
        await database.close()


async def _check_pepper_recorded(pepper_file: Path, database: PostgresDatabase, report: Report) -> None:
    """The pepper is the one the keystore's first node recorded (the relay refuses another)."""
    from keystore.opening import pepper_matches, wrong_pepper

    try:
        pepper = await asyncio.to_thread(load_pepper, pepper_file)
    except PepperError:
        return  # reported already
    if await pepper_matches(database, pepper) is False:
        report.problem(f"[keystore] pepper_file: {wrong_pepper(pepper_file, database.where)}")


async def _check_routes_in_use(config: Config, store: KeyStore, report: Report) -> None:
    """Every route the keystore's keys and mailboxes name (relay/app.py stops at the first)."""
    known = set(config.route_names)
    for route, users in (await store.routes_in_use()).items():
        if route not in known:
            report.problem(f"the keystore routes {', '.join(users[:3])} to {route!r}, "
                           "which is no [[upstream]] or [[group]] here")


# ------------------------------------------------------------ the command


def main(explicit_config: str | None, *, as_json: bool = False) -> int:
    """`relay check-config`: exit 0 without problems (warnings allowed), 1 with any, 2 when
    no config file is named."""
    try:
        path = resolve_config_path(explicit_config)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    report = check_file(path)
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
        return 0 if report.ok else 1
    for item in report.listeners:
        target = item.address
        if item.kind == "metrics":
            target = f"http://{item.address}/metrics"
        elif item.kind == "admin":
            target = f"{'http' if is_loopback(item.host) else 'https'}://{item.address}/ (keystore serve)"
        print(f"listen: {item.label} on {target}")
    for text in report.warnings:
        print(f"warning: {text}", file=sys.stderr)
    for text in report.problems:
        print(f"problem: {text}", file=sys.stderr)
    problems = _count(len(report.problems), "problem")
    print(f"{report.source}: {problems}, {_count(len(report.warnings), 'warning')}")
    return 0 if report.ok else 1


def _count(n: int, noun: str) -> str:
    return f"{n or 'no'} {noun}{'' if n == 1 else 's'}"
