"""Routing: which upstreams a message is tried on, in which order.

A message's route is its key's route, else its mailbox's, else `[routing] default`; it
names an `[[upstream]]` or a `[[group]]`. A group gives an ordered plan for each attempt:
`failover` always starts at the first member; `round_robin` starts at the next member in
a (weighted) rotation and fails over through the rest, so one down provider costs a
message a detour, not a retry.
"""

from __future__ import annotations

import itertools

from dns.exception import DNSException

from relay.config import Config, ConfigError
from relay.delivery.courier import Courier
from relay.delivery.mx import MxCourier
from relay.delivery.smarthost import SmarthostCourier

__all__ = ["Router", "make_couriers"]


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
    return couriers


class Router:
    def __init__(self, config: Config, couriers: dict[str, Courier]) -> None:
        assert config.routing is not None
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

    def plan(self, route: str | None) -> list[Courier]:
        """The couriers to try, in order, for one delivery attempt."""
        name = self.resolve(route)
        members = self._plans[name]
        rotation = self._rotations.get(name)
        if rotation is None:
            return members
        start = next(rotation)
        return members[start:] + members[:start]
