"""One delivery attempt of one message: through its route's couriers in order, then what
it means (sent, deferred, failed, expired, a bounce), as one AttemptRecord to store.

Each courier is admitted by provider health first (relay/delivery/health.py): one that
is down is skipped, and what each one returns is reported back to it. If every courier
was skipped, the pending recipients are deferred with the plan's 451 "down" reply
without a connection; that counts as an attempt, so the retry schedule spaces them out.

Nothing here writes the spool except `note`, which stores the recipients already decided
before the attempt moves on to the next upstream of a group, so a crash there cannot
send them again. An unexpected error never loses what was learnt before it: the
outcomes gathered so far are returned with the error, and the error counts toward the
poison limit (relay/queue/model.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from relay import maillog
from relay.delivery.courier import Outcome, Status
from relay.delivery.routing import Plan
from relay.metrics import Metrics
from relay.queue.dsn import build_dsn
from relay.queue.model import AttemptRecord, Delivery, QueueItem, format_age, new_queue_id
from relay.queue.schedule import retry_delay

__all__ = ["attempt", "partial_record"]

log = logging.getLogger("relay.queue")

_NO_RESULT = Outcome(Status.DEFERRED, "451 4.3.0 no result from the upstream")
_SPOOL_STATUS = {Status.SENT: "sent", Status.FAILED: "failed", Status.DEFERRED: "pending"}
Note = Callable[[str, dict[str, tuple[str, str]]], Awaitable[None]]


async def attempt(
    delivery: Delivery, plan: Plan, *, note: Note, hostname: str,
    retry_schedule: tuple[float, ...], max_lifetime: float, outcomes: dict[str, Outcome],
    metrics: Metrics | None = None,
) -> AttemptRecord:
    """`outcomes` (the caller's, empty) is filled as replies arrive, so an error, or a
    cancellation at shutdown, keeps what was learnt (see partial_record). `metrics` counts
    each courier's recipients by outcome, as the mail log lines them."""
    record = AttemptRecord(
        message_id=delivery.id,
        next_attempt=time.time() + retry_delay(retry_schedule, delivery.attempts + 1),
    )
    try:
        await _through_plan(delivery, plan, note, outcomes, max_lifetime, metrics)
    except Exception as exc:  # noqa: BLE001 - keep what was learnt; the error counts as poison
        log.exception("unexpected error delivering %s", delivery.id)
        record.error = repr(exc)
    record.outcomes = {rcpt: _row(outcome) for rcpt, outcome in outcomes.items()}
    pending = [r for r in delivery.pending if r not in outcomes or outcomes[r].status is Status.DEFERRED]
    if pending and pending[0] in outcomes:
        record.last_error = outcomes[pending[0]].reply
    failures = [(r, o.reply) for r, o in outcomes.items() if o.status is Status.FAILED]
    failures += delivery.unnotified
    if failures:
        _bounce(record, delivery, failures, hostname)
    return record


async def _through_plan(delivery: Delivery, plan: Plan, note: Note, outcomes: dict[str, Outcome],
                        max_lifetime: float, metrics: Metrics | None) -> None:
    started = time.time()
    age = started - delivery.created
    pending = list(delivery.pending)
    tried = False
    for index, courier in enumerate(plan.couriers if pending else []):
        ticket = plan.admit(courier)
        if ticket is None:  # down: its backoff runs, or another delivery is probing it
            continue
        tried = True
        began = time.time()
        with ticket:  # an error or a cancellation reports nothing (and frees a probe's turn)
            results = await courier.deliver(delivery.mail_from, pending, delivery.body)
            results = {rcpt: results.get(rcpt, _NO_RESULT) for rcpt in pending}
            ticket.report(results)
        outcomes.update(results)
        for rcpt in pending:
            maillog.attempt(delivery, rcpt, courier.name, outcomes[rcpt], delay=age)
        if metrics is not None:
            metrics.delivery_attempted(courier.name, [outcomes[r].status.value for r in pending],
                                       created=delivery.created, began=began)
        decided = {r: _row(outcomes[r]) for r in pending if outcomes[r].status is not Status.DEFERRED}
        pending = [r for r in pending if r not in decided]
        if not pending:
            return
        if decided and index + 1 < len(plan.couriers):
            await _note(note, delivery.id, decided)
    if pending and not tried:
        down = plan.all_down()
        for rcpt in pending:
            outcomes[rcpt] = down
            maillog.attempt(delivery, rcpt, plan.route, down, delay=age)
        if metrics is not None:
            metrics.delivery_all_down(plan.route, len(pending))
    if pending and age >= max_lifetime:
        for rcpt in pending:
            last = outcomes[rcpt].reply if rcpt in outcomes else "none"
            outcomes[rcpt] = Outcome(Status.FAILED, f"554 5.4.7 expired in queue after {format_age(age)}; "
                                                    f"last reply: {last}")
            maillog.attempt(delivery, rcpt, "-", outcomes[rcpt], delay=age)
        if metrics is not None:
            metrics.delivery_expired_now(len(pending), created=delivery.created)


def partial_record(delivery: Delivery, outcomes: dict[str, Outcome]) -> AttemptRecord:
    """What an attempt interrupted (at shutdown) had learnt: stored so that nothing already
    sent is sent again; its failures are bounced at the next attempt."""
    return AttemptRecord(message_id=delivery.id, outcomes={r: _row(o) for r, o in outcomes.items()},
                         next_attempt=time.time())


def _bounce(record: AttemptRecord, delivery: Delivery, failures: list[tuple[str, str]],
            hostname: str) -> None:
    """Attach the DSN for `failures` to the record, stored in the same commit as the
    failures; if it cannot be built, the failures stay un-notified and it is tried again."""
    if not delivery.mail_from:
        log.warning("not bouncing a bounce: %s failed for %d recipient(s)", delivery.id, len(failures))
        record.notified = [rcpt for rcpt, _ in failures]
        return
    now = time.time()
    try:
        original = delivery.body if isinstance(delivery.body, bytes) else delivery.body.head
        body = build_dsn(original=original, mail_from=delivery.mail_from, queue_id=delivery.id,
                         arrival=delivery.created, failures=failures, hostname=hostname, now=now)
    except Exception as exc:  # noqa: BLE001 - the failures stay recorded; the DSN is retried
        log.exception("cannot build the bounce for %s", delivery.id)
        record.error = record.error or f"building the bounce failed: {exc!r}"
        return
    record.bounce = QueueItem(
        id=new_queue_id(), created=now, mail_from="", recipients=[delivery.mail_from],
        key_id=delivery.key_id, mailbox=delivery.mailbox, route=delivery.route, body=body,
    )
    record.notified = [rcpt for rcpt, _ in failures]


async def _note(note: Note, message_id: str, decided: dict[str, tuple[str, str]]) -> None:
    try:
        await note(message_id, decided)
    except Exception:  # noqa: BLE001 - best effort: the final record stores them too
        log.warning("cannot store the outcomes of %s before failing over; carrying on", message_id)


def _row(outcome: Outcome) -> tuple[str, str]:
    return _SPOOL_STATUS[outcome.status], outcome.reply

