"""The relay's file descriptor budget, checked before it listens.

Every connection is a descriptor, and so is a message being received to a file, an
upstream connection, the sqlite files and the event loop's own. With the usual soft limit
of 1024 a relay configured for 1000 connections failed in the middle of the night with
`Too many open files` (new clients and deliveries alike). So at start the relay raises its
soft RLIMIT_NOFILE to the hard limit (allowed without privileges) and refuses to start,
as a configuration error, when even that cannot serve `[server] max_connections`.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from relay.config import Config, ConfigError
from relay.smtpd.connections import REFUSALS_OVER_TLS

__all__ = ["FdBudget", "ensure_fd_limit", "fd_budget"]

# Descriptors that do not scale with connections: listening sockets, the keystore and
# spool (sqlite: db, -wal, -shm, on more than one connection), the log, DNS sockets, the
# event loop's epoll/eventfd/signal pipe, certificate and key files while read.
_FIXED = 64


@dataclass(frozen=True, slots=True)
class FdBudget:
    sessions: int  # 2 per connection: the socket and a message being received to a file
    refusals: int  # implicit-TLS refusals in their handshake (connections.REFUSALS_OVER_TLS)
    upstream: int  # every [[upstream]]'s max_connections
    fixed: int

    @property
    def total(self) -> int:
        return self.sessions + self.refusals + self.upstream + self.fixed


def fd_budget(config: Config) -> FdBudget:
    return FdBudget(
        sessions=2 * config.server.max_connections,
        refusals=REFUSALS_OVER_TLS,
        upstream=sum(u.max_connections for u in config.upstream),
        fixed=_FIXED,
    )


def ensure_fd_limit(config: Config) -> int:
    """Raise the soft limit to the hard one; return it, or raise ConfigError if too low."""
    need = fd_budget(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, need.total)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep the soft limit; the check below says whether it is enough
    if soft != resource.RLIM_INFINITY and soft < need.total:
        raise ConfigError(
            f"{config.source}: [server] max_connections = {config.server.max_connections} needs about "
            f"{need.total} file descriptors ({need.sessions} for sessions, {need.upstream} for upstream "
            f"connections, {need.refusals + need.fixed} for the rest) but this process may open "
            f"only {soft} (hard limit {_show(hard)}): raise the limit (systemd: LimitNOFILE=, "
            "shell: ulimit -n) or lower max_connections"
        )
    return soft


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)
