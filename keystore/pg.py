"""PostgreSQL plumbing shared by the PostgreSQL backends (issue 12): the keystore's, the
queue's and the cluster-wide limits'.

The driver is psycopg 3 (async, binary, with psycopg_pool), chosen by measurement:
`bench/pg_drivers.py` (the bench on core 0, the server on core 1) gave the keystore's AUTH
read a median of 517-541 µs against asyncpg's 704-705 µs. With 32 logins in flight
asyncpg did more (2990 vs 2832, then 4874 vs 3579 logins a second), but a relay's login
waits for its one read, so latency is what a client feels, and either rate is far above
what the relay's own CPU allows per core. psycopg also speaks the `?`-style SQL we share
with sqlite after one mechanical translation (`to_pg`), has a sync API the tests and the
CLI can use, and a pipeline mode (the queue's put() is one round trip).

Each backend is a *component* with its own list of migrations, versioned in one table
(`keyrelay_schema`), applied at open under a transaction-scoped advisory lock so that
several relays starting at once migrate once. As with sqlite: one transaction per
version, a released migration is never edited, a new one is appended, and a database
newer than this code is refused rather than used.

Connections are in autocommit mode; a backend opens a transaction explicitly
(`async with conn.transaction()`), so a read never holds a snapshot open.
"""

from __future__ import annotations

import functools
import re
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
import psycopg_pool

__all__ = [
    "PgError", "is_postgres_url", "migrate", "open_pool", "redact", "schema_version", "scrub", "to_pg",
]

PgError = psycopg.Error  # what a backend turns into "unavailable, try again later"

_RECONNECT_BACKOFF_SPAN = 5.0  # seconds; the longest wait between attempts is then 2 s

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS keyrelay_schema (
    component text PRIMARY KEY,
    version integer NOT NULL
)
"""


def is_postgres_url(text: str | None) -> bool:
    return bool(text) and text.startswith(("postgresql://", "postgres://"))


# libpq takes a password in the query string too (`?password=`, `&sslpassword=`: the
# client key's passphrase); and a password with an unencoded '/', '?' or '#' ends the URL's
# authority early for urlsplit (libpq then fails to connect, and says so with the URL)
_QUERY_SECRET = re.compile(r"([?&][^=&#]*password=)[^&#]*", re.IGNORECASE)
_USERINFO = re.compile(r"^([a-z]+://[^:@/?#]*):(.*)@", re.IGNORECASE | re.DOTALL)


def redact(url: str) -> str:
    """The URL for a log line or an error: any password replaced by `***` (in the user
    part, in the query string, or in a user part a stray '/' makes look like the path)."""
    try:
        parts = urlsplit(url)
        port = parts.port if parts.password is not None else None
    except ValueError:
        return "postgresql://(unparsable URL)"
    if parts.password is not None:
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username}:***@{host}" + (f":{port}" if port else "")
        url = urlunsplit(parts._replace(netloc=netloc))
    else:
        url = _USERINFO.sub(r"\1:***@", url, count=1)
    return _QUERY_SECRET.sub(r"\1***", url)


def _secrets(url: str) -> list[str]:
    """The passwords in `url` as they may appear in a driver's message: as written (libpq
    quotes a malformed token as it is) and percent-decoded; longest first."""
    found: list[str] = []
    match = _USERINFO.match(url)
    if match:
        found.append(match.group(2))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.append(password)
    found += [m.group(0).split("=", 1)[1] for m in _QUERY_SECRET.finditer(url)]
    found += [unquote(text) for text in found]
    return sorted({text for text in found if text and text != "***"}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` (a driver's message about `url`) with every password in the URL masked."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


_PLACEHOLDER = re.compile(r"'[^']*'|\?|%")


@functools.lru_cache(maxsize=512)
def to_pg(sql: str) -> str:
    """SQL written for sqlite, in PostgreSQL's dialect: `?` placeholders become `%s` (a
    literal `%` is doubled, as psycopg wants), quoted strings are left alone, and
    `group_concat(x, sep)` becomes `string_agg(x, sep)`. Everything else the backends
    write is standard SQL both engines read alike."""

    def swap(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        return text.replace("%", "%%")

    return _PLACEHOLDER.sub(swap, sql).replace("group_concat(", "string_agg(")


# TCP keepalives on every connection to the database: a database host that vanished
# without a reset (power lost, a partition) is noticed in about 25 s on both sides, not
# after the kernel's two hours: by the client (a put or a renew() would otherwise hang
# past the lease) and by the server (which would otherwise keep a dead node's session, and
# with it the node's lock on its name, refusing the node's own restart). The server-side
# settings are session settings any role may set.
_SERVER_KEEPALIVES = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"


def keepalives(url: str) -> dict[str, object]:
    """Connection arguments adding both sides' keepalives to `url` (whose own `options`,
    if any, are kept: they come after ours, so an operator's setting wins)."""
    own = psycopg.conninfo.conninfo_to_dict(url).get("options")
    return {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "options": f"{_SERVER_KEEPALIVES} {own}" if own else _SERVER_KEEPALIVES}


async def open_pool(url: str, *, name: str, min_size: int = 1, max_size: int = 8,
                    timeout: float = 10.0, settings: dict[str, str] | None = None,
                    ) -> psycopg_pool.AsyncConnectionPool:
    """An open pool of autocommit connections; psycopg.OperationalError (with the password
    left out of the message) if the server cannot be reached within `timeout`; a URL libpq
    cannot read is refused here, before the pool's workers log its complaint (which quotes
    the offending part of the URL: the password, for a bad %-escape in it) at every try.
    `settings`: server settings SET on each new connection (the URL's own `options` stay)."""
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise psycopg.ProgrammingError(f"{redact(url)}: {scrub(_first_line(exc), url)}") from None
    async def configure(conn: psycopg.AsyncConnection) -> None:
        for setting, value in (settings or {}).items():
            await conn.execute("SELECT set_config(%s, %s, false)", (setting, value))

    pool = psycopg_pool.AsyncConnectionPool(
        url, min_size=min_size, max_size=max_size, name=name, open=False, timeout=timeout,
        kwargs={"autocommit": True, "application_name": f"keyrelay {name}", **keepalives(url)},
        configure=configure if settings else None,
        # the pool doubles its wait between attempts until this many seconds, then starts
        # again from 1 s at the next request: left at its 300 s, a database back after an
        # outage of T seconds was reconnected to up to T seconds later (451 meanwhile)
        reconnect_timeout=_RECONNECT_BACKOFF_SPAN,
    )
    try:
        await pool.open(wait=True, timeout=timeout)
    except psycopg_pool.PoolTimeout:
        await pool.close()
        # the pool's own message says nothing; one direct try gives the server's reason
        try:
            conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(2, int(timeout)))
        except psycopg.Error as exc:
            raise psycopg.OperationalError(f"{redact(url)}: {scrub(_first_line(exc), url)}") from None
        await conn.close()
        raise psycopg.OperationalError(f"{redact(url)}: no connection within {timeout:g} s") from None
    return pool


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def schema_version(conn: psycopg.AsyncConnection, component: str) -> int:
    await conn.execute(_SCHEMA_TABLE)
    cur = await conn.execute("SELECT version FROM keyrelay_schema WHERE component = %s", (component,))
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def migrate(pool: psycopg_pool.AsyncConnectionPool, component: str, migrations: list[str]) -> int:
    """Bring `component`'s tables to len(migrations); the version reached. Several
    processes may call this at once: each version is applied by exactly one of them."""
    async with pool.connection() as conn:
        while True:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"keyrelay:{component}",))
                version = await schema_version(conn, component)
                if version > len(migrations):
                    raise psycopg.DataError(
                        f"the {component} tables are at version {version}, newer than this relay "
                        f"knows ({len(migrations)}): upgrade the relay, or restore a matching backup"
                    )
                if version == len(migrations):
                    return version
                await conn.execute(migrations[version])
                await conn.execute(
                    "INSERT INTO keyrelay_schema (component, version) VALUES (%s, %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, version + 1),
                )
