"""Prometheus metrics: what the relay counts, and the endpoint that serves them.

One `Metrics` per relay, with its own CollectorRegistry (never prometheus-client's global
one: tests run several relays in one process, and a reload must not register twice).
Components take it as a constructor parameter whose default is a private `Metrics()`, so
code and tests that build them alone keep working and count into nothing anybody reads.

Call sites use the small methods below rather than the metric objects, so the key id
label (only with `[metrics] key_id_labels = true`) and label-child caching live in one
place. Label values are always from a fixed set (reasons, outcomes, listener kinds, TLS
versions) or from the configuration (provider names); never a client address, a
username, a reply text or anything else a client or remote server chooses. Key ids are
label values only when asked for: they grow with the keystore.

What is read rather than counted (queue depth, oldest message, provider health,
connections open) is collected when the page is scraped (relay/metrics/collectors.py).
The HTTP side, /metrics, /healthz and /readyz, is relay/metrics/endpoint.py.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric

from keystore.legacy import ACCEPTED
from relay import replies
from relay.metrics.collectors import DepthSource, ProviderHealthCollector, QueueCollector, Snapshot

__all__ = ["AUTH_OUTCOMES", "REFUSAL_REASONS", "Metrics", "data_refusal_reason", "handshake_failure"]

log = logging.getLogger("relay.metrics")

# prometheus-client adds a `*_created` series (the OpenMetrics start time) beside every
# counter and histogram child; Prometheus finds counter resets by itself, so they would
# only double the page. Process-wide, and read at each scrape.
disable_created_metrics()

# AUTH outcomes: "ok", the keystore's Reason values for a refused login (a wrong secret,
# an unknown mailbox or key are all "bad_credentials"), and the relay's own.
AUTH_OUTCOMES = (
    "ok", "bad_credentials", "revoked", "disabled", "expired", "suspended", "no_send_permission",
    "not_allowed_from", "password_retired", "throttled", "keystore_unavailable", "legacy_busy",
    "malformed", "abandoned",
)
# Legacy-password checks (keystore/legacy.py's observer), per libpass scheme.
LEGACY_CHECK_OUTCOMES = ("match", "mismatch", "cached", "skipped", "busy")
LEGACY_SCHEMES = tuple(ACCEPTED)
# Why a message was refused (at MAIL, at the end of DATA, or while DATA was read).
REFUSAL_REASONS = (
    "auth_required", "key_unusable", "keystore_unavailable", "sender_not_owned", "rate_limited",
    "header", "header_too_big", "too_big", "line_too_long", "bare_line_ending", "spool_full",
    "spool_error",
)
# Connections refused or ended by a limit.
CONNECTION_REFUSALS = ("max_connections", "per_address", "pre_auth_commands")

# Delivery latency, acceptance to a recipient's final outcome: seconds when all is well,
# up to days when a provider defers (the retry schedule), capped by the queue lifetime.
_LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 5 * 24 * 3600)
# One upstream session (connect to final reply): what a slow provider shows up in.
_ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

_DATA_REASONS = {
    replies.TOO_BIG: "too_big",
    replies.LINE_TOO_LONG: "line_too_long",
    replies.BARE_LINE_ENDING: "bare_line_ending",
    replies.SPOOL_FULL: "spool_full",
    replies.SPOOL_ERROR: "spool_error",
}
_HEADER_TOO_BIG = replies.HEADER_TOO_BIG.partition("{")[0]


def data_refusal_reason(reply: str) -> str:
    """The reason label for a refusal while DATA was read (relay/smtpd/data.py's replies)."""
    if reply.startswith(_HEADER_TOO_BIG):
        return "header_too_big"
    return _DATA_REASONS.get(reply, "spool_error")


def handshake_failure(error: BaseException | None) -> str:
    """The outcome label of a TLS handshake that did not give a session: "timeout" (asyncio
    aborts it with ConnectionAbortedError at the handshake timeout), "failed" (a TLS error:
    no common version or cipher, not TLS at all) or "dropped" (the client left, or the
    relay dropped it at shutdown)."""
    if isinstance(error, ConnectionAbortedError):
        return "timeout"
    if isinstance(error, ssl.SSLError):
        return "failed"
    return "dropped"


class NodeLabelled:
    """The registry as it is scraped: every sample carries `node="NAME"` ([cluster] node),
    so the series of several relays behind one load balancer stay apart wherever they are
    collected (a federation, a remote-write, one job scraping all nodes), whatever
    `instance` label the scraper adds. Metric objects stay unlabelled: call sites and
    label-child caching do not change."""

    def __init__(self, registry: Any, node: str) -> None:
        self._registry = registry
        self.node = node

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [sample._replace(labels={**sample.labels, "node": self.node})
                                for sample in family.samples]
            yield labelled

    def restricted_registry(self, names: Iterable[str]) -> NodeLabelled:
        """`/metrics?name[]=...` (prometheus-client's WSGI app asks the registry for this)."""
        return NodeLabelled(self._registry.restricted_registry(names), self.node)


class Metrics:
    """Every metric of one relay, on `self.registry`; `self.exposed` is what /metrics
    serves (with the node label). See the README's Metrics section."""

    def __init__(self, *, key_id_labels: bool = False, node: str = "") -> None:
        self.key_id_labels = key_id_labels
        self.registry = CollectorRegistry()
        self.exposed: Any = NodeLabelled(self.registry, node) if node else self.registry
        registry = self.registry
        key = ("key",) if key_id_labels else ()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

        self.connections_open = Gauge(
            "keyrelay_connections_open",
            "Connections holding a slot: sessions, and TLS handshakes in progress on the implicit-TLS "
            "listener", registry=registry)
        self.connections = Counter(
            "keyrelay_connections", "Connections given a slot (all listeners)", registry=registry)
        self.connections_refused = Counter(
            "keyrelay_connections_refused",
            "Connections refused (max_connections, per_address) or ended (pre_auth_commands) by a limit",
            ["reason"], registry=registry)
        self.tls_handshakes = Counter(
            "keyrelay_tls_handshakes",
            "TLS handshakes of sessions by listener (submission: STARTTLS; submissions: implicit TLS), "
            "outcome (ok, failed, timeout, dropped) and TLS version (none unless ok)",
            ["listener", "outcome", "version"], registry=registry)
        self.auth = Counter(
            "keyrelay_auth_attempts", "AUTH attempts by outcome", ["outcome", *key], registry=registry)
        self.legacy_verifications = Counter(
            "keyrelay_legacy_password_checks",
            "Legacy-password checks (issue 13) by hash scheme and outcome: match and mismatch computed "
            "the hash; cached answered from a recent success; skipped refused without a hash (an "
            "address over its AUTH ceiling); busy refused with 454 (too many waiting)",
            ["scheme", "outcome"], registry=registry)
        self.messages_accepted = Counter(
            "keyrelay_messages_accepted", "Messages accepted (250 after DATA: in the spool)",
            list(key), registry=registry)
        self.messages_refused = Counter(
            "keyrelay_messages_refused", "Messages refused, at MAIL or DATA, by reason",
            ["reason", *key], registry=registry)
        self.delivery_attempts = Counter(
            "keyrelay_delivery_attempts",
            "Recipients tried on an upstream, by provider ([[upstream]] name) and outcome "
            "(sent, deferred, failed)", ["provider", "outcome"], registry=registry)
        self.delivery_expired = Counter(
            "keyrelay_delivery_expired",
            "Recipients failed because their message outlived [queue] max_queue_lifetime", registry=registry)
        self.delivery_route_down = Counter(
            "keyrelay_delivery_route_down_deferred",
            "Recipients deferred without a connection: every upstream of their route was down "
            "(provider health)", ["route"], registry=registry)
        self.delivery_latency = Histogram(
            "keyrelay_delivery_latency_seconds",
            "Seconds from a message's acceptance to each recipient's final outcome (sent or failed)",
            ["outcome"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.delivery_attempt_duration = Histogram(
            "keyrelay_delivery_attempt_duration_seconds",
            "Seconds one delivery attempt took on an upstream (one session, all its recipients)",
            ["provider"], buckets=_ATTEMPT_BUCKETS, registry=registry)
        self.certificate_expiry = Gauge(
            "keyrelay_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the listeners' certificate ([tls] cert) expires", registry=registry)
        self.queue = QueueCollector()
        self.provider_health = ProviderHealthCollector()
        registry.register(self.queue)
        registry.register(self.provider_health)
        self._zeros(key_id_labels)

    def _zeros(self, key_id_labels: bool) -> None:
        """Series for every known reason from the start, so a first refusal is a rise from
        0 (rate() sees it) rather than a new series. Not per key: key ids are not known."""
        for reason in CONNECTION_REFUSALS:
            self._child(self.connections_refused, reason)
        for scheme in LEGACY_SCHEMES:
            for outcome in LEGACY_CHECK_OUTCOMES:
                self._child(self.legacy_verifications, scheme, outcome)
        if key_id_labels:
            return
        for outcome in AUTH_OUTCOMES:
            self._child(self.auth, outcome)
        for reason in REFUSAL_REASONS:
            self._child(self.messages_refused, reason)

    def _child(self, metric: Any, *values: str) -> Any:
        """The labelled child, cached: labels() validates and locks on every call."""
        slot = (id(metric), values)
        child = self._children.get(slot)
        if child is None:
            child = self._children[slot] = metric.labels(*values)
        return child

    # ------------------------------------------------------------ connections

    def watch_connections(self, count: Callable[[], int]) -> None:
        """`keyrelay_connections_open` reads `count()` at scrape time (an int read: no cost
        per connection, and safe from the scrape's thread)."""
        self.connections_open.set_function(count)

    def connection_taken(self) -> None:
        self.connections.inc()

    def connection_refused(self, reason: str) -> None:
        self._child(self.connections_refused, reason).inc()

    def tls_handshake(self, listener: str, outcome: str, version: str | None = None) -> None:
        self._child(self.tls_handshakes, listener, outcome, version or "none").inc()

    # ------------------------------------------------------------ AUTH and messages

    def auth_outcome(self, outcome: str, key_id: str | None = None) -> None:
        """`key_id` only for a key the keystore knows (ok, or a right secret on an unusable
        key): a made-up key id must never become a label value."""
        if self.key_id_labels:
            self._child(self.auth, outcome, key_id or "").inc()
        else:
            self._child(self.auth, outcome).inc()

    def legacy_check(self, scheme: str, outcome: str) -> None:
        self._child(self.legacy_verifications, scheme, outcome).inc()

    def message_accepted(self, key_id: str) -> None:
        if self.key_id_labels:
            self._child(self.messages_accepted, key_id).inc()
        else:
            self.messages_accepted.inc()

    def message_refused(self, reason: str, key_id: str | None = None) -> None:
        if self.key_id_labels:
            self._child(self.messages_refused, reason, key_id or "").inc()
        else:
            self._child(self.messages_refused, reason).inc()

    # ------------------------------------------------------------ delivery

    def delivery_attempted(self, provider: str, outcomes: Iterable[str], *, created: float,
                           began: float) -> None:
        """One courier call: `outcomes` holds each recipient's status ("sent", "deferred",
        "failed"); `created` is the message's acceptance time and `began` when the call
        started (both time.time()). A sent or failed recipient is final: its latency since
        acceptance is observed; a deferred one is observed when it is finally decided."""
        now = time.time()
        self._child(self.delivery_attempt_duration, provider).observe(max(now - began, 0.0))
        for outcome in outcomes:
            self._child(self.delivery_attempts, provider, outcome).inc()
            if outcome != "deferred":
                self._child(self.delivery_latency, outcome).observe(max(now - created, 0.0))

    def delivery_all_down(self, route: str, recipients: int) -> None:
        self._child(self.delivery_route_down, route).inc(recipients)

    def delivery_expired_now(self, recipients: int, *, created: float) -> None:
        """Recipients failed at the end of the queue lifetime (no upstream was tried for it)."""
        self.delivery_expired.inc(recipients)
        latency = max(time.time() - created, 0.0)
        for _ in range(recipients):
            self._child(self.delivery_latency, "failed").observe(latency)

    # ------------------------------------------------------------ read at scrape time

    def watch_queue(self, store: DepthSource) -> None:
        """Queue depth and oldest message, read from the spool at each scrape."""
        self.queue.source = store

    def watch_key_changes(self, listening: Callable[[], bool]) -> None:
        """Only with a PostgreSQL keystore (a sqlite one has no notifications to miss)."""
        gauge = Gauge(
            "keyrelay_keystore_notifications_listening",
            "1 while this node hears the PostgreSQL keystore's key changes at once (LISTEN); 0 while "
            "it follows them only through the periodic recheck ([auth] recheck_interval)",
            registry=self.registry)
        gauge.set_function(lambda: 1.0 if listening() else 0.0)

    def watch_provider_health(self, snapshot: Callable[[], Snapshot] | None) -> None:
        """`snapshot()` (e.g. ProviderHealth.snapshot) is called on the relay's event loop at
        each scrape; call again to re-point it (a reload that builds a new one), or with
        None to stop."""
        self.provider_health.watch(snapshot)

    def certificate_loaded(self, cert: Path) -> None:
        """Set the expiry gauge from the certificate file the listeners now use (at start;
        again after a reload loads a new one). The first certificate of the chain is the
        server's. A file that cannot be read is left for the TLS setup to report."""
        try:
            first = x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("cannot read the certificate's expiry from %s: %s", cert, exc)
            return
        self.certificate_expiry.set(first.not_valid_after_utc.timestamp())
