"""The spool file itself: an older spool is migrated in place, and remote text is made
safe before it is stored."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from relay.delivery.replytext import MAX_REPLY, clean
from relay.queue.schema import MIGRATIONS
from tests.conftest import running_relay
from tests.test_delivery import MESSAGE, wait_spool_empty


async def test_a_spool_from_before_versioning_is_migrated_and_delivered(tmp_path, sink):
    """A spool written by the relay before its schema was versioned (user_version 0): one
    recipient already failed and bounced, one still pending. The new relay delivers the
    pending one once and does not bounce the failure a second time."""
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO message (id, created, mail_from, key_id, mailbox, route, body, attempts, "
                 "next_attempt, last_error) VALUES ('old1', ?, 'alice@example.com', 'k', "
                 "'alice@example.com', NULL, ?, 1, 0, '451 4.3.0 later')", (time.time(), MESSAGE))
    conn.executemany("INSERT INTO recipient (message_id, address, status, reply) VALUES ('old1', ?, ?, ?)",
                     [("gone@example.net", "failed", "550 5.1.1 no such user"),
                      ("bob@example.net", "pending", "451 4.3.0 later")])
    conn.commit()
    conn.close()
    async with running_relay(tmp_path, sink) as h:
        await wait_spool_empty(h)
        (message,) = h.sink.messages
        assert message.rcpt_tos == ["bob@example.net"]
    conn = sqlite3.connect(tmp_path / "spool.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    # a finished message took its recipients and its body along
    assert [conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("message", "recipient", "body")] == [0, 0, 0]
    conn.close()


async def test_a_spool_newer_than_the_relay_is_refused(tmp_path, sink):
    conn = sqlite3.connect(tmp_path / "spool.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    from relay.queue import SpoolError

    with pytest.raises(SpoolError, match="spool schema version .* is newer than this program"):
        async with running_relay(tmp_path, sink):
            pass


@pytest.mark.parametrize(("raw", "safe"), [
    ("250 2.0.0 OK", "250 2.0.0 OK"),
    ("550 5.1.1 caf\udce9", "550 5.1.1 caf\ufffd"),  # a byte that was not UTF-8 (surrogateescape)
    ("451 first\r\n451 second", "451 first 451 second"),  # one line
    ("550 \x1b]0;owned\x07 red", "550 ]0;owned red"),  # no terminal escapes
    ("550 \u2028forged", "550 forged"),
    ("", ""),
])
def test_remote_text_is_cleaned(raw, safe):
    assert clean(raw) == safe
    clean(raw).encode("utf-8")  # storable, loggable


def test_remote_text_is_bounded():
    text = clean("550 " + "x" * 10_000)
    assert len(text) == MAX_REPLY and text.endswith("\u2026")


async def test_one_failing_write_does_not_cost_its_batch_neighbours_their_commit(tmp_path):
    """Writes share commits (group commit); an op that fails on its own (a bug: here one
    that divides by zero after writing) is answered alone, and the others are stored."""
    from relay.queue import QueueItem, new_queue_id
    from relay.queue.sqlite import SqliteQueueStore

    def broken(conn):
        conn.execute("DELETE FROM message")
        return 1 / 0

    store = await SqliteQueueStore.open(tmp_path / "spool.db", relay=True)
    try:
        items = [QueueItem(id=new_queue_id(), created=time.time(), mail_from="a@example.com",
                           recipients=["b@example.net"], key_id="k", mailbox="a@example.com", route=None,
                           body=MESSAGE) for _ in range(5)]
        results = await asyncio.gather(*(store.put(item, claimed_by=None) for item in items[:2]),
                                       store._write_one(broken),
                                       *(store.put(item, claimed_by=None) for item in items[2:]),
                                       return_exceptions=True)
        assert isinstance(results[2], ZeroDivisionError)
        assert [r for i, r in enumerate(results) if i != 2] == [None] * 5
        assert store.commits == 1  # they did share one commit
        assert await store.count() == 5
    finally:
        await store.close()
