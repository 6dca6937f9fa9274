"""Ingress hosts shared by path: which service serves what, in the order the gateway tries.

Both targets route a host the same way. Each service that claims a host adds
one block of routes per path prefix it takes there (its own routes, each
restricted to the prefix: `RouteMatch.under`), longest prefix first; the
service that takes the host without `paths` adds its routes unrestricted,
last, and catches what the others leave. A service's default route matches
everything, so its block catches every request under its prefix: the
longest prefix wins, as in Istio's delegate VirtualServices and nginx.

The host's objects (its server in a Gateway, its VirtualService) belong to one
claimant, the host's owner: the one without `paths`, else the first in mesh
order. `check.claims` has made sure one host and prefix is one service's, and
that a host's claimants agree on its port.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler import model as m


@dataclass(frozen=True)
class Claim:
    """What one service asks of the gateway: its hosts, port and path prefixes (none: the rest)."""

    service: str
    hosts: tuple[str, ...]
    port: int
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostRoutes:
    """One ingress host: its owner, and the (service, prefix or None for the rest) blocks in the order tried."""

    host: str
    port: int
    owner: str
    blocks: tuple[tuple[str, str | None], ...]

    @property
    def alone(self) -> bool:
        """Only its owner serves it (as a host of its own, or under its own paths only)."""
        return all(service == self.owner for service, _ in self.blocks)


def plan(claims: list[Claim]) -> list[HostRoutes]:
    """Every ingress host of the environment, in the order first claimed (`claims` in mesh order)."""
    by_host: dict[str, list[tuple[int, Claim]]] = {}
    for order, claim in enumerate(claims):
        for host in claim.hosts:
            by_host.setdefault(host, []).append((order, claim))
    hosts = []
    for host, claimants in by_host.items():
        rest = [c for _, c in claimants if not c.paths]
        owner = (rest or [claimants[0][1]])[0].service
        prefixed = sorted(((-len(p), p, order, c.service) for order, c in claimants for p in c.paths))
        blocks = tuple((service, prefix) for _, prefix, _, service in prefixed) + tuple((c.service, None) for c in rest)
        hosts.append(HostRoutes(host, claimants[0][1].port, owner, blocks))
    return hosts


def routes_under(service: m.Service, prefix: str | None) -> tuple[m.Route, ...]:
    """A service's routes as its block on `prefix` tries them (None: all of them, as they are).
    On a prefix each is named `SERVICE.ROUTE`, so a host's shared list says whose route it is."""
    if prefix is None:
        return service.routes
    kept = []
    for route in service.routes:
        match = route.match.under(prefix)
        if match is not None:
            kept.append(replace(route, match=match, name=f"{service.name}.{route.name}"))
    return tuple(kept)
