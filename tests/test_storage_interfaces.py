"""keystore/interface.py declares what a keystore backend must do, relay/queue/store.py
what a spool backend must do; the sqlite implementations must have every method with the
very signature declared (names, kinds, defaults, annotations), so the Protocols and the
backends cannot drift apart. The PostgreSQL backends (issue 12) join the lists."""

from __future__ import annotations

import inspect

import pytest

from keystore.interface import AdminStore, AuthStore
from keystore.postgresdb import PostgresDatabase
from keystore.sqldb import Database, Executor
from keystore.sqlitedb import SqliteDatabase
from keystore.store import KeyStore
from relay.queue.postgres import PostgresQueueStore
from relay.queue.sqlite import SqliteQueueStore
from relay.queue.store import QueueStore

BACKENDS = [KeyStore]  # one class holds the keystore's rules; the engines are its adapters:
KEYSTORE_DATABASES = [SqliteDatabase, PostgresDatabase]
QUEUE_BACKENDS = [SqliteQueueStore, PostgresQueueStore]


def declared(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(protocol).items()
            if inspect.iscoroutinefunction(member)}


def test_the_protocols_split_the_auth_path_from_the_admin_operations():
    auth, admin = declared(AuthStore), declared(AdminStore)
    assert {"authenticate", "recheck", "routes_in_use", "close"} <= set(auth)
    assert not set(auth) & set(admin)
    assert {"create_key", "update_key", "revoke_keys", "create_token", "verify_token",
            "audit_events"} <= set(admin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", [AuthStore, AdminStore])
def test_backend_implements_every_method_with_the_declared_signature(backend, protocol):
    for name, signature in declared(protocol).items():
        member = getattr(backend, name, None)
        assert inspect.iscoroutinefunction(member), f"{backend.__name__}.{name} is missing or not async"
        assert inspect.signature(member) == signature, (
            f"{backend.__name__}.{name}{inspect.signature(member)} != {protocol.__name__}.{name}{signature}")


@pytest.mark.parametrize("backend", QUEUE_BACKENDS)
def test_queue_backend_implements_every_method_with_the_declared_signature(backend):
    methods = declared(QueueStore)
    assert {"put", "claim", "record", "schedule", "retry", "hold", "delete"} <= set(methods)
    for name, signature in methods.items():
        member = getattr(backend, name, None)
        assert inspect.iscoroutinefunction(member), f"{backend.__name__}.{name} is missing or not async"
        assert inspect.signature(member) == signature, (
            f"{backend.__name__}.{name}{inspect.signature(member)} != QueueStore.{name}{signature}")


@pytest.mark.parametrize("database", KEYSTORE_DATABASES)
@pytest.mark.parametrize("protocol", [Executor, Database])
def test_keystore_database_adapter_implements_every_method_with_the_declared_signature(database, protocol):
    for name, signature in declared(protocol).items():
        member = getattr(database, name, None)
        assert inspect.iscoroutinefunction(member), f"{database.__name__}.{name} is missing or not async"
        assert inspect.signature(member) == signature, (
            f"{database.__name__}.{name}{inspect.signature(member)} != {protocol.__name__}.{name}{signature}")
    assert callable(getattr(database, "transaction", None)), f"{database.__name__}.transaction"


def test_the_signature_check_sees_a_difference():
    class Drifted:
        async def recheck(self, identity, fresh=False): ...

    assert inspect.signature(Drifted.recheck) != declared(AuthStore)["recheck"]
