"""The little the keystore needs from a SQL database, so sqlite (keystore/sqlitedb.py) and
PostgreSQL (keystore/postgresdb.py) are two small adapters and KeyStore keeps every rule
and every statement.

Statements are written once, in sqlite's `?` style; the PostgreSQL adapter translates them
(keystore.pg.to_pg). Both adapters raise the keystore's own errors: KeystoreUnavailable
when the database cannot answer (the relay says 454 / 451, the CLI exits 1), Conflict when
a write would break a uniqueness rule (two writers racing for one name), never a driver's
exception, so no caller depends on which engine is behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

__all__ = ["Database", "Executor", "Params"]

Params = Sequence[object]


class Executor(Protocol):
    """Statements on one connection: the database itself (each statement on its own), or
    an open transaction."""

    async def fetch(self, sql: str, params: Params = ()) -> list[tuple]: ...
    async def execute(self, sql: str, params: Params = ()) -> None: ...
    async def executemany(self, sql: str, rows: Iterable[Params]) -> None: ...
    async def insert_returning_id(self, sql: str, params: Params = ()) -> int:
        """Run an INSERT into a table with an integer `id`; the new row's id."""
        ...


class Database(Executor, Protocol):
    """One keystore database; `transaction()` serialises writers (across processes and, for
    PostgreSQL, across nodes), so KeyStore's check-then-write rules hold."""

    where: str  # how to name it to a person: a path, or a URL without its password

    def transaction(self) -> AbstractAsyncContextManager[Executor]: ...

    async def read(self, sql: str, params: Params = ()) -> list[tuple]:
        """The login path's read: never queued behind a writer."""
        ...

    async def backup(self, target: Path) -> None: ...
    async def close(self) -> None: ...
