"""The shared queue's tables in PostgreSQL (component "queue" of keystore/pg.py's
migrations: one transaction per version, a released migration is never edited).

The same model as the sqlite spool (relay/queue/schema.py, version 2), with what several
relays on one database need besides:

* a claim is an owner (`node:pid`) and a lease end (`lease_until`, seconds since the
  epoch on the database's clock): a claim whose lease ended is anyone's to take;
* `queue_version` is a counter every admin change (`relay queue retry/hold/...`) bumps,
  so each node knows to read the schedule again;
* `queue_node` lists the nodes (for `relay status`), with the time each last renewed its
  leases.

Bodies live in a table apart, as in sqlite, so the schedule and listings never read
them; stored uncompressed (STORAGE EXTERNAL): a big body is sent in pieces, and
substring() of an uncompressed value reads only the pieces it returns. Tables are
prefixed `queue_` because the keystore may share the database.
"""

from __future__ import annotations

__all__ = ["COMPONENT", "MIGRATIONS"]

COMPONENT = "queue"

MIGRATIONS: list[str] = [
    # 1: messages, bodies, recipients, the admin change counter, the nodes
    """
    CREATE TABLE queue_message (
        id text PRIMARY KEY,
        created double precision NOT NULL,
        mail_from text NOT NULL,
        key_id text NOT NULL,
        mailbox text NOT NULL,
        route text,
        size bigint NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt double precision NOT NULL,
        last_error text,
        held boolean NOT NULL DEFAULT false,
        claimed text,
        lease_until double precision,
        delete_requested boolean NOT NULL DEFAULT false,
        errors integer NOT NULL DEFAULT 0
    );
    CREATE INDEX queue_message_due ON queue_message (next_attempt);
    CREATE INDEX queue_message_claimed ON queue_message (claimed, lease_until) WHERE claimed IS NOT NULL;
    CREATE INDEX queue_message_created ON queue_message (created);
    CREATE TABLE queue_body (
        message_id text PRIMARY KEY REFERENCES queue_message (id) ON DELETE CASCADE,
        data bytea NOT NULL
    );
    ALTER TABLE queue_body ALTER COLUMN data SET STORAGE EXTERNAL;
    CREATE TABLE queue_recipient (
        message_id text NOT NULL REFERENCES queue_message (id) ON DELETE CASCADE,
        position integer NOT NULL,
        address text NOT NULL,
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
        reply text,
        notified boolean NOT NULL DEFAULT false,
        PRIMARY KEY (message_id, address)
    );
    CREATE TABLE queue_version (
        id integer PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL
    );
    INSERT INTO queue_version (id, version) VALUES (1, 0);
    CREATE TABLE queue_node (
        node text PRIMARY KEY,
        owner text NOT NULL,
        started double precision NOT NULL,
        last_seen double precision NOT NULL,
        stopped double precision
    );
    """,
]
