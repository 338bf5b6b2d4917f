"""The keystore's exceptions, in a module of their own so the storage adapters
(keystore/sqlitedb.py, keystore/postgresdb.py) raise the same ones the store and its callers
know, without importing the store. keystore.store re-exports them: callers keep importing
them from there."""

from __future__ import annotations

__all__ = ["Conflict", "KeystoreUnavailable", "NotFound", "StoreError"]


class StoreError(Exception):
    """An operation the keystore refuses: bad input (an invalid address, a rate limit of 0,
    ...); the subclasses say when it is something else. The CLI exits 1 on any of them,
    the HTTP API answers 400, 404 or 409."""


class NotFound(StoreError):
    """The workspace, mailbox, key or token named does not exist."""


class Conflict(StoreError):
    """The request is valid but the record's state refuses it (already revoked, already
    suspended, an address in use, a key limit reached, ...)."""


class KeystoreUnavailable(Exception):
    """The database cannot be used right now; callers should answer 'try again later'."""
