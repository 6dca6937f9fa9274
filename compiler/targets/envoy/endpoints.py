"""ClusterLoadAssignments: the addresses behind each cluster.

A cluster's addresses come from the environment's `endpoints`: a version's
own list, or every address for the whole-service cluster. All-IP clusters
are EDS and get a ClusterLoadAssignment here; a cluster with a DNS name is
STRICT_DNS and carries its assignment inline (see `clusters`), as istiod
does for DNS-resolved ServiceEntries.
"""

from __future__ import annotations

from typing import NamedTuple

from compiler.model import Address, Port, Service, port_address
from compiler.targets.envoy.common import cluster_name
from compiler.xds.resources import ENDPOINTS


class Upstream(NamedTuple):
    """One cluster of a service: its port, version ("" for the whole service) and addresses."""

    port: Port
    version: str
    name: str  # the cluster's name
    addresses: tuple[Address, ...]
    dns: bool  # some address is a DNS name: a STRICT_DNS cluster with its assignment inline


def upstreams(service: Service) -> tuple[Upstream, ...]:
    """Every cluster of a service: per port (in the service's order), the whole service ("") then each version.

    Addresses keep the environment's order with duplicates removed: an
    address listed twice would get twice the traffic. Which addresses are
    DNS names is worked out once per service (parsing an IP is not free).
    """
    if service.external is not None and service.external.resolution == "DNS":
        # The host itself, on each port: what istiod makes of a DNS ServiceEntry without endpoints.
        return tuple(Upstream(port, "", cluster_name(port.number, service.fqdn), (Address(service.fqdn, port.number),), True)
                     for port in service.ports)
    whole = _unique(service.endpoints.all())
    dns_names = {a for a in whole if not a.is_ip}
    by_version = dict(service.endpoints.by_version)
    subsets = [("", whole, bool(dns_names))]
    for version in service.versions:
        addresses = _unique(by_version.get(version.name, ()))
        subsets.append((version.name, addresses, bool(dns_names) and any(a in dns_names for a in addresses)))
    return tuple(Upstream(port, version, cluster_name(port.number, service.fqdn, version),
                          _on_port(addresses, port, service.ports), dns)
                 for port in service.ports for version, addresses, dns in subsets)


def _on_port(addresses: tuple[Address, ...], port: Port, ports: tuple[Port, ...]) -> tuple[Address, ...]:
    """A service's addresses as one port's cluster dials them (`model.port_address`)."""
    if len(ports) < 2:
        return addresses
    return tuple(dict.fromkeys(port_address(a, port, ports) for a in addresses))


def lower(upstreams: tuple[Upstream, ...]) -> list[dict]:
    """One ClusterLoadAssignment per EDS cluster among `upstreams`, in their order.

    An address is in several assignments (each port's, the whole service's
    and its version's): they share one LbEndpoint value.
    """
    shared: dict[Address, dict] = {}
    return [{"@type": ENDPOINTS, **assignment(u.name, u.addresses, shared)} for u in upstreams if not u.dns]


def assignment(name: str, addresses: tuple[Address, ...], shared: dict[Address, dict] | None = None) -> dict:
    """A ClusterLoadAssignment body (no `@type`), one locality holding every address.

    `shared` memoises each address's LbEndpoint across calls.
    """
    shared = {} if shared is None else shared
    body: dict = {"cluster_name": name}
    if addresses:
        body["endpoints"] = [{"lb_endpoints": [shared.get(a) or shared.setdefault(a, _lb_endpoint(a))
                                               for a in addresses]}]
    return body


def _lb_endpoint(address: Address) -> dict:
    socket = {"address": address.host, "port_value": address.port}
    return {"endpoint": {"address": {"socket_address": socket}}}


def _unique(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    return tuple(dict.fromkeys(addresses))
