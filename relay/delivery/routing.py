"""Routing: which upstreams a message is tried on, in which order.

A message's route is its key's route, else its mailbox's, else `[routing] default`; it
names an `[[upstream]]` or a `[[group]]`. A group gives an ordered plan for each attempt:
`failover` always starts at the first member; `round_robin` starts at the next member in
a (weighted) rotation and fails over through the rest, so one down provider costs a
message a detour, not a retry.

Provider health (relay/delivery/health.py) is applied as the attempt goes: a member that
is down is skipped, unless its backoff is over and no other delivery is probing it; if
every member was skipped, the attempt defers without a connection (`Plan.all_down`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from dns.exception import DNSException

from relay.config import Config, ConfigError
from relay.delivery.courier import Courier, Outcome, Status
from relay.delivery.health import ProviderHealth, Ticket, format_seconds
from relay.delivery.mx import MxCourier
from relay.delivery.smarthost import SmarthostCourier

__all__ = ["Plan", "Router", "make_couriers"]


def make_couriers(config: Config) -> dict[str, Courier]:
    """One courier per `[[upstream]]`, by kind; a file or resolver problem is a config error."""
    couriers: dict[str, Courier] = {}
    hostname = config.server.hostname
    for upstream in config.upstream:
        try:
            if upstream.kind == "mx":
                couriers[upstream.name] = MxCourier(upstream, config.dns, local_hostname=hostname)
            else:
                couriers[upstream.name] = SmarthostCourier(upstream, local_hostname=hostname)
        except (OSError, DNSException) as exc:  # password file, or no resolver configuration
            raise ConfigError(f"{config.source}: [[upstream]] {upstream.name}: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{config.source}: [[upstream]] {upstream.name} password_file: "
                              f"{upstream.password_file}: not UTF-8 text") from None
    return couriers


@dataclass(frozen=True, slots=True)
class Plan:
    """One attempt's upstreams, in the order to try them, and the health that may skip them."""

    route: str  # the upstream or group the message goes to
    couriers: list[Courier]
    health: ProviderHealth

    def admit(self, courier: Courier) -> Ticket | None:
        """Leave to deliver through `courier` now (report its results on the ticket), or
        None: it is down, skip it."""
        return self.health.admit(courier.name)

    def all_down(self) -> Outcome:
        """The deferral when every upstream was skipped: no connection was made."""
        wait = self.health.next_probe_in(c.name for c in self.couriers)
        when = "a probe is under way" if not wait else f"next probe in {format_seconds(wait)}"
        if len(self.couriers) == 1 and self.couriers[0].name == self.route:
            return Outcome(Status.DEFERRED, f"451 4.4.1 upstream {self.route} is down ({when})")
        return Outcome(Status.DEFERRED, f"451 4.4.1 all upstreams of route {self.route} are down ({when})")


class Router:
    def __init__(self, config: Config, couriers: dict[str, Courier],
                 health: ProviderHealth | None = None) -> None:
        """`health`: the relay's, kept across reloads (the relay calls its `follow` when
        this router goes into service); without one, a health of the router's own."""
        assert config.routing is not None
        if health is None:
            health = ProviderHealth(config.provider_health)
            health.follow(config)
        self.health = health
        self._default = config.routing.default
        self._couriers = couriers
        self._plans: dict[str, list[Courier]] = {name: [c] for name, c in couriers.items()}
        self._rotations: dict[str, itertools.cycle[int]] = {}
        for group in config.group:
            self._plans[group.name] = [couriers[m] for m in group.members]
            if group.strategy == "round_robin":
                weights = group.weights or (1,) * len(group.members)
                slots = [i for i, w in enumerate(weights) for _ in range(w)]
                self._rotations[group.name] = itertools.cycle(slots)

    def knows(self, route: str) -> bool:
        return route in self._plans

    def resolve(self, route: str | None) -> str:
        """The upstream or group a message with this route goes to."""
        return route if route and route in self._plans else self._default

    def concurrency(self, name: str) -> int:
        """Deliveries at once on a route: its upstream's max_connections, or its members'
        sum for a group, so a slow route can never take another route's turn."""
        return sum(courier.max_connections for courier in set(self._plans[name]))

    def plan(self, route: str | None) -> Plan:
        """The couriers to try, in order, for one delivery attempt."""
        name = self.resolve(route)
        members = self._plans[name]
        rotation = self._rotations.get(name)
        if rotation is not None:
            start = next(rotation)
            members = members[start:] + members[:start]
        return Plan(name, members, self.health)
