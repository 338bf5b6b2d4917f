"""What the per-key send rate and the AUTH throttle need from a store shared by several
relays (issue 12: a key limited to 60 messages a minute gets 60 in total, not 60 per
node). Two small interfaces, each with an in-process implementation for one relay
(relay/policy.py's RateLimiter; no ledger at all for the throttle) and a PostgreSQL one
for a cluster (keystore/pglimits.py).

They differ in what happens when the shared store cannot be asked, on purpose:

* a send rate that cannot be checked refuses the message for now (`LimitsUnavailable`,
  answered 451 4.3.0): letting it through would make the limit no limit at all;
* a failure ledger that cannot be asked is left out (`LimitsUnavailable` too, and the
  throttle carries on with its own node's counts): the local budget still holds, and
  refusing every login would turn a database hiccup into an outage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["FailureLedger", "LimitsUnavailable", "SendRates", "SlotCount"]


class LimitsUnavailable(Exception):
    """The shared store did not answer in time, or refused; the message never says more
    than the cause's first line (no URL, no password)."""


class SendRates(Protocol):
    """A token bucket per auth key: `per_minute` messages (the key's own rate if it has
    one), refilled continuously. `per_minute` is the relay's default, changed by a reload;
    a rate of 0 or less means no limit."""

    per_minute: int

    async def allow(self, key_id: str, per_minute: int | None = None) -> bool:
        """True if the key may send one more message now (and that message is counted);
        LimitsUnavailable if that cannot be known."""
        ...


SlotCount = tuple[int, float]  # (failures within the window, age in seconds of the newest)


class FailureLedger(Protocol):
    """Failed logins counted for the whole cluster, per slot (an opaque digest of the
    throttle's (kind, network, name) counter, so no username is stored in clear)."""

    async def counts(self, slots: Sequence[tuple[bytes, int]], window: float) -> dict[bytes, SlotCount]:
        """For each (slot, cap): its failures within the last `window` seconds, counted up
        to `cap` (the throttle only compares them with its budget), and how old the newest
        is. Slots with none are left out. One round trip; LimitsUnavailable on failure."""
        ...

    async def add(self, slots: Sequence[bytes], window: float) -> None:
        """One failure now for each of `slots` (kept for at least `window` seconds)."""
        ...
