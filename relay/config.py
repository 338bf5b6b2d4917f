"""The relay's configuration: one TOML file read into frozen dataclasses.

Both the relay and the `keystore` CLI read the same file, so every section lives here.
Validation is strict on purpose: an unknown key is almost always a typo that would
otherwise silently fall back to a default, so it is refused with the file, the key path
and what was expected (`config.toml: [queue] path: expected a string`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path

from keystore.http.site import is_loopback
from keystore.secretfile import secret_file_problem

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "HealthConfig",
    "LogConfig",
    "MetricsConfig",
    "ConfigError",
    "Duration",
    "KeystoreConfig",
    "QueueConfig",
    "RoutingConfig",
    "ServerConfig",
    "TLSConfig",
    "UpstreamConfig",
    "check_secret_file",
    "check_secret_files",
    "cross_check",
    "load_config",
    "parse_config",
    "parse_duration",
    "resolve_config_path",
]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and key."""


class Duration(float):
    """Seconds; in TOML either a number of seconds or a string such as "90s", "15m", "24h"."""


def parse_duration(text: str) -> float:
    """Turn "90s", "15m", "24h", "30d" (or plain seconds) into seconds.

    Raises ValueError with a message fit for an operator.
    """
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 15m, 24h, 30d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    hostname: str = "localhost"
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    max_message_size: int = 26_214_400
    # The header block (every field, not the body) a message may have; Postfix's
    # header_size_limit is 100 KiB per field, ours bounds the whole block the relay parses.
    max_header_size: int = 102_400
    # Message data all sessions together may hold in memory while it arrives; beyond it
    # (and for any message over 1 MiB) the data goes to a file beside the spool.
    max_data_memory: int = 67_108_864
    max_recipients: int = 100
    max_connections: int = 1000
    # Connections from one client address (IPv6: one /64) at once; Postfix's
    # smtpd_client_connection_count_limit is 50 too. A shared egress (a CRM, a NAT) needs
    # room, one scanner must not take every slot.
    max_connections_per_address: int = 50
    idle_timeout: Duration = Duration(300)
    # Idle timeout until AUTH succeeds (then idle_timeout): a connection that has not
    # logged in holds its slot for at most this long between commands.
    pre_auth_timeout: Duration = Duration(30)
    check_header_from: bool = True
    rate_per_minute: int = 600
    # At SIGTERM: how long a session in the middle of a message may take to finish it;
    # sessions not in a transaction get 421 4.3.2 at once. Keep it under the unit's
    # TimeoutStopSec minus the few seconds deliveries get to record what they did.
    shutdown_grace: Duration = Duration(20)
    # Listeners behind a TCP load balancer (entries of `submission` or `submissions`, as written there):
    # each connection starts with a PROXY protocol v2 header, accepted only from a
    # `proxy_from` network, and its source address is the client's (relay/smtpd/proxy.py).
    proxy_listeners: tuple[str, ...] = ()
    proxy_from: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """The AUTH throttle (relay/auth.py says how it counts) and the session recheck.

    There is no "off": 0 is refused, since a throttle that silently stops is worse than a
    large number an operator chose on purpose."""

    max_failures: int = 10  # wrong secrets per (client address, username) per window
    max_failures_per_address: int | None = None  # per client address (IPv6: /64); None: 10 x max_failures
    failure_window: Duration = Duration(300)
    recheck_interval: Duration = Duration(0.5)
    # legacy passwords (issue 13): hash verifications at once (processes; ARGON2ID takes its
    # memory cost each), and how many more may wait before a login is told 454, try later
    legacy_verifications: int = 2
    legacy_queue: int = 64

    @property
    def address_ceiling(self) -> int:
        if self.max_failures_per_address is not None:
            return self.max_failures_per_address
        return 10 * self.max_failures


@dataclass(frozen=True, kw_only=True)
class KeystoreConfig:
    """Where the keystore lives: a sqlite file (`path`, the default) or, for several
    relays, a PostgreSQL database (`url`, postgresql://...). Exactly one of them. The pepper
    is always a local file, the same on every node (keys hashed with one are unusable with
    another)."""

    path: Path | None = None
    url: str | None = None
    pepper_file: Path
    default_key_limit: int = 100


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """This relay among several sharing one PostgreSQL keystore and queue (issue 12).

    `node` names it in metrics, logs, `relay status` and the queue's claims (default: the
    host's name); two relays running at once must not share one. A delivery's claim on a
    shared queue message lasts `lease`, renewed while the delivery runs; a node that dies
    leaves its messages to the others once their leases end."""

    node: str = field(default_factory=lambda: socket.gethostname())
    lease: Duration = Duration(60)


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """The spool. `path` is a sqlite file; with `url` (postgresql://..., shared by several
    relays) the messages live in PostgreSQL and `path`'s folder holds only this node's own
    files (the state `relay status` reads, large messages while they arrive)."""

    path: Path
    url: str | None = None
    retry_schedule: tuple[Duration, ...] = (
        Duration(60), Duration(300), Duration(900), Duration(3600), Duration(10800),
    )
    max_queue_lifetime: Duration = Duration(5 * 86400)
    workers: int | None = None  # no longer used (per-upstream max_connections); accepted, warned


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """A provider: a smarthost (`kind = "smarthost"`, needs host) or direct MX delivery
    (`kind = "mx"`: each recipient domain's MX hosts, opportunistic STARTTLS)."""

    name: str
    kind: str = "smarthost"
    host: str | None = None
    port: int | None = None  # default: 587 for a smarthost, 25 for MX delivery
    tls: str = "starttls"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None  # trust this CA (PEM) instead of the system store
    allow_plaintext: bool = False  # tls = "none" to a non-loopback host
    allow_private_targets: bool = False  # mx: connect to loopback/private addresses an MX names
    max_connections: int = 20  # Postfix's default_destination_concurrency_limit
    timeout: Duration = Duration(60)

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 25 if self.kind == "mx" else 587


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """A delivery group: `failover` tries members in order; `round_robin` spreads
    messages over them (by `weights` if given) and fails over to the others."""

    name: str
    members: tuple[str, ...]
    strategy: str = "failover"
    weights: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    """Resolver for MX delivery and DKIM checks; empty nameservers = the system's."""

    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: Duration = Duration(5)


@dataclass(frozen=True, kw_only=True)
class DkimConfig:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """Logging: `level` (reloadable) and `format`: "text" (`event key=value ...`) or "json"
    (one object per line, for log shippers). `relay --log-level` overrides the level."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Prometheus metrics, /healthz and /readyz on `listen` (HOST:PORT); none if unset.
    Key ids become label values only if `key_id_labels` is true (they grow with the keystore)."""

    listen: str | None = None
    key_id_labels: bool = False


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """`keystore serve`: the admin HTTP API and console on `listen` (HOST:PORT); none if
    unset. Plain HTTP on loopback, HTTPS with [tls]'s certificate anywhere else. A console
    login lasts `session_ttl`; `public_host` is the SMTP host the console tells people to
    put in their mail clients (default: [server] hostname)."""

    listen: str | None = None
    session_ttl: Duration = Duration(8 * 3600)
    public_host: str | None = None


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    """Provider health ([provider_health], relay/delivery/health.py): after `down_after`
    session-level failures in a row (connect, TLS, greeting, EHLO, STARTTLS, AUTH, a 421 at
    MAIL FROM) a smarthost is down for `backoff`, doubled at each failed probe up to
    `max_backoff`; groups skip it while another member is up."""

    down_after: int = 3
    backoff: Duration = Duration(30)
    max_backoff: Duration = Duration(600)


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    default: str


@dataclass(frozen=True, kw_only=True)
class Config:
    source: Path
    keystore: KeystoreConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    queue: QueueConfig | None = None
    routing: RoutingConfig | None = None
    upstream: tuple[UpstreamConfig, ...] = ()
    group: tuple[GroupConfig, ...] = ()
    dns: DnsConfig = field(default_factory=DnsConfig)
    dkim: tuple[DkimConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    provider_health: HealthConfig = field(default_factory=HealthConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def state_path(self) -> Path | None:
        """The running relay's state (provider health, recent deliveries, sessions), written
        beside the spool for `relay status`; None without a [queue]."""
        return None if self.queue is None else self.queue.path.with_name("relay-state.json")

    def upstream_named(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstream if u.name == name), None)

    def group_named(self, name: str) -> GroupConfig | None:
        return next((g for g in self.group if g.name == name), None)

    @property
    def route_names(self) -> list[str]:
        """Names a key, a mailbox or [routing] default may use: upstreams and groups."""
        return [u.name for u in self.upstream] + [g.name for g in self.group]


def resolve_config_path(explicit: str | None) -> Path:
    """`--config PATH`, else $RELAY_CONFIG; refusing to guess keeps admins off the wrong file."""
    chosen = explicit or os.environ.get("RELAY_CONFIG")
    if not chosen:
        raise ConfigError("no configuration: pass --config PATH or set RELAY_CONFIG")
    return Path(chosen)


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config, or ConfigError naming the first problem (`relay check-config` lists all)."""
    config = parse_config(path)
    problems = cross_check(config, Path(path))
    if problems:
        raise ConfigError(problems[0])
    return config


def parse_config(path: str | os.PathLike[str]) -> Config:
    """Read and type-check the file, without the checks across sections (`cross_check`):
    ConfigError at the first thing that stops it being built at all."""
    source = Path(path)
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # an editor that saved it as Latin-1
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    loader = _Loader(source)
    return loader.build(Config, raw, "", extra={"source": source.resolve()})


def _check_proxy(server: ServerConfig, source: Path, add: typing.Callable[[str], None]) -> None:
    """proxy_listeners name listeners, STARTTLS or implicit TLS (the header is then read
    before the handshake), and need the networks of the load balancers they accept it from."""
    for listener in server.proxy_listeners:
        if listener not in server.submission and listener not in server.submissions:
            add(f"{source}: [server] proxy_listeners: {listener!r} is not one of [server] submission "
                "or submissions")
    if server.proxy_listeners and not server.proxy_from:
        add(f"{source}: [server] proxy_from: required with proxy_listeners (the load balancers' networks)")
    for network in server.proxy_from:
        try:
            ip_network(network, strict=True)
        except ValueError:
            add(f"{source}: [server] proxy_from: {network!r} is not a network in CIDR notation")


def cross_check(config: Config, source: Path | None = None) -> list[str]:
    """Every problem across sections (values, names, references), in file order; each names
    `source` (default: config.source) and the key. Empty when the config is usable."""
    source = config.source if source is None else source
    problems: list[str] = []
    add = problems.append
    for listener in (*config.server.submission, *config.server.submissions):
        try:
            split_hostport(listener)
        except ValueError as exc:
            add(f"{source}: [server] listener {listener!r}: {exc}")
    for name in ("max_message_size", "max_header_size", "max_data_memory"):
        if getattr(config.server, name) < 1:
            add(f"{source}: [server] {name}: at least 1 (there is no \"off\")")
    _check_proxy(config.server, source, add)
    _check_storage(config, source, add)
    _check_auth(config.auth, source, add)
    _check_operations(config, source, add)
    for name in ("max_connections", "max_connections_per_address", "idle_timeout", "pre_auth_timeout"):
        if getattr(config.server, name) <= 0:
            add(f"{source}: [server] {name}: must be more than 0 (there is no \"off\")")
    if (config.server.submission or config.server.submissions) and config.tls is None:
        add(f"{source}: [tls]: required when [server] has listeners")
    names = config.route_names
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            add(f"{source}: upstream or group name {name!r}: defined twice")
    for upstream in config.upstream:
        _check_upstream(upstream, source, add)
    upstream_names = {u.name for u in config.upstream}
    for group in config.group:
        where = f"{source}: [[group]] {group.name}"
        if group.strategy not in ("failover", "round_robin"):
            add(f"{where} strategy: expected failover or round_robin, not {group.strategy!r}")
        if not group.members:
            add(f"{where} members: a group needs at least one upstream")
        for member in group.members:
            if member not in upstream_names:
                add(f"{where} members: no [[upstream]] named {member!r}")
        if group.weights and (len(group.weights) != len(group.members) or not any(group.weights)):
            add(f"{where} weights: one weight per member, not all zero")
    if config.routing and config.routing.default not in names:
        add(f"{source}: [routing] default: no [[upstream]] or [[group]] named {config.routing.default!r}")
    return problems


_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _check_storage(config: Config, source: Path, add: typing.Callable[[str], None]) -> None:
    """[keystore] path or url, [queue] url, [cluster]."""
    ks = config.keystore
    if (ks.path is None) == (ks.url is None):
        add(f"{source}: [keystore]: set path (a sqlite file) or url (postgresql://...), one of them")
    for where, url in (("[keystore] url", ks.url), ("[queue] url", config.queue and config.queue.url)):
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            add(f"{source}: {where}: expected a postgresql:// URL")
    if not _NODE_RE.match(config.cluster.node):
        add(f"{source}: [cluster] node: {config.cluster.node!r}: letters, digits, '.', '_' and '-', "
            "at most 63, starting with a letter or digit")
    if config.cluster.lease < 5:
        add(f"{source}: [cluster] lease: at least 5s (it is renewed every lease/3 during a delivery)")


def _check_auth(auth: AuthConfig, source: Path, add: typing.Callable[[str], None]) -> None:
    if auth.max_failures < 1:
        add(
            f"{source}: [auth] max_failures: at least 1 (the AUTH throttle cannot be turned off; "
            "a large number makes it lenient)"
        )
    if auth.address_ceiling < auth.max_failures:
        add(f"{source}: [auth] max_failures_per_address: at least max_failures ({auth.max_failures})")
    if auth.failure_window <= 0:
        add(f"{source}: [auth] failure_window: longer than 0")
    if not 1 <= auth.legacy_verifications <= 64:
        add(f"{source}: [auth] legacy_verifications: from 1 to 64 (password hashes checked at once)")
    if not 0 <= auth.legacy_queue <= 10_000:
        add(f"{source}: [auth] legacy_queue: from 0 to 10000 (password checks waiting for a place)")


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _check_operations(config: Config, source: Path, add: typing.Callable[[str], None]) -> None:
    """[log], [metrics], [admin], [provider_health] and the shutdown grace."""
    if config.log.level.lower() not in _LOG_LEVELS:
        add(f"{source}: [log] level: expected one of {', '.join(_LOG_LEVELS)}, not {config.log.level!r}")
    if config.log.format not in ("text", "json"):
        add(f"{source}: [log] format: expected text or json, not {config.log.format!r}")
    if config.metrics.listen is not None:
        try:
            split_hostport(config.metrics.listen)
        except ValueError as exc:
            add(f"{source}: [metrics] listen {config.metrics.listen!r}: {exc}")
    if config.admin.listen is not None:
        try:
            host, _ = split_hostport(config.admin.listen)
        except ValueError as exc:
            add(f"{source}: [admin] listen {config.admin.listen!r}: {exc}")
        else:
            if not is_loopback(host) and config.tls is None:
                add(f"{source}: [admin] listen {config.admin.listen!r}: off loopback the console "
                    "serves HTTPS and needs [tls]")
    if config.admin.session_ttl <= 0:
        add(f"{source}: [admin] session_ttl: longer than 0")
    health = config.provider_health
    if health.down_after < 1:
        add(f"{source}: [provider_health] down_after: at least 1")
    if health.backoff <= 0 or health.max_backoff < health.backoff:
        add(f"{source}: [provider_health] backoff: more than 0, and max_backoff at least backoff")
    if config.server.shutdown_grace <= 0:
        add(f"{source}: [server] shutdown_grace: must be more than 0")


_LOOPBACK = ("127.", "::1", "localhost")


def _check_upstream(upstream: UpstreamConfig, source: Path, add: typing.Callable[[str], None]) -> None:
    where = f"{source}: [[upstream]] {upstream.name}"
    if upstream.kind not in ("smarthost", "mx"):
        add(f"{where} kind: expected smarthost or mx, not {upstream.kind!r}")
    if upstream.tls not in ("none", "starttls", "implicit"):
        add(f"{where} tls: expected one of none, starttls, implicit, not {upstream.tls!r}")
    if upstream.kind == "smarthost":
        if not upstream.host:
            add(f"{where} host: required for a smarthost")
        elif (upstream.tls == "none" and not upstream.allow_plaintext
              and not upstream.host.startswith(_LOOPBACK)):
            add(
                f"{where} tls: \"none\" sends mail and credentials in clear text; only for loopback "
                "hosts unless allow_plaintext = true"
            )
    if upstream.username and not upstream.password_file:
        add(f"{where}: username needs password_file")
    if upstream.max_connections < 1:
        add(f"{where} max_connections: at least 1")


def check_secret_files(config: Config) -> None:
    """Refuse to start with an upstream password file that another user could read or change
    (keystore/secretfile.py has the rule). The TLS key is checked where it is loaded
    (relay/tlsconf.py), the pepper by the keystore."""
    for upstream in config.upstream:
        if upstream.password_file is not None:
            where = f"{config.source}: [[upstream]] {upstream.name} password_file"
            check_secret_file(upstream.password_file, where, "password file")


def check_secret_file(path: Path, where: str, what: str) -> None:
    """ConfigError unless `path` is a file only the running user owns and can read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: {path}: cannot read: {exc.strerror}") from None
    problem = secret_file_problem(path, info, what)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def split_hostport(text: str) -> tuple[str, int]:
    """"127.0.0.1:2587" / "[::1]:2587" → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets: [ADDR]:PORT")
    return host or "0.0.0.0", int(port)


class _Loader:
    """Builds dataclasses from TOML tables, checking each value against the field's type."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.base = source.resolve().parent

    def fail(self, where: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.source}: {where}: {message}")

    def build(self, cls: type, table: object, section: str, extra: dict | None = None):
        where = section or "top level"
        if not isinstance(table, dict):
            self.fail(where, "expected a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = dict(extra or {})
        for key, value in table.items():
            if key not in fields or key in values:
                self.fail(where, f"unknown key {key!r}")
            values[key] = self.convert(hints[key], value, _child(section, key))
        for name, spec in fields.items():
            required = (
                spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            )
            if name not in values and required:
                self.fail(_child(section, name), "required value is missing")
        return cls(**values)

    def convert(self, hint, value, where: str):
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
            return self.convert(inner, value, where)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if not isinstance(value, list):
                self.fail(where, "expected a list")
            return tuple(self.convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, where)
        return self.scalar(hint, value, where)

    def scalar(self, hint, value, where: str):
        if hint is bool:
            if not isinstance(value, bool):
                self.fail(where, "expected true or false")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.fail(where, "expected a non-negative integer")
            return value
        if hint is Duration:
            seconds: float | None = None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                seconds = value
            elif isinstance(value, str):
                try:
                    seconds = parse_duration(value)
                except ValueError as exc:
                    self.fail(where, str(exc))
            if seconds is None:
                self.fail(where, 'expected a duration such as "90s", "15m", "24h" or seconds')
            if not math.isfinite(seconds):  # TOML's inf, or more digits than a float holds
                self.fail(where, "expected a finite duration")
            return Duration(seconds)
        if not isinstance(value, str):
            self.fail(where, "expected a string")
        if hint is Path:
            if "\0" in value:  # the OS refuses it (ValueError) wherever it is opened
                self.fail(where, "a path cannot contain a NUL character")
            return self.base / Path(value).expanduser()
        return value


def _child(section: str, key: str) -> str:
    if not section:
        return f"[{key}]"
    return f"{section} {key}"
