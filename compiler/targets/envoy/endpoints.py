"""ClusterLoadAssignments: the addresses behind each cluster.

A cluster's addresses come from the environment's `endpoints`: a version's
own list, or every address for the whole-service cluster. All-IP clusters
are EDS and get a ClusterLoadAssignment here; a cluster with a DNS name is
STRICT_DNS and carries its assignment inline (see `clusters`), as istiod
does for DNS-resolved ServiceEntries.
"""

from __future__ import annotations

from compiler.model import Address, Mesh, Service
from compiler.targets.envoy.common import ENDPOINTS, cluster_name


def subsets(service: Service) -> tuple[tuple[str, tuple[Address, ...]], ...]:
    """(version, addresses) for every cluster of a port: the whole service ("") first.

    Addresses keep the environment's order with duplicates removed: an
    address listed twice would get twice the traffic.
    """
    whole = ("", _unique(service.endpoints.all()))
    return (whole,) + tuple((v.name, _unique(service.endpoints.of(v.name))) for v in service.versions)


def is_dns(addresses: tuple[Address, ...]) -> bool:
    return any(not a.is_ip for a in addresses)


def assignment(name: str, addresses: tuple[Address, ...]) -> dict:
    """A ClusterLoadAssignment body (no `@type`), one locality holding every address."""
    body: dict = {"cluster_name": name}
    if addresses:
        body["endpoints"] = [{"lb_endpoints": [_lb_endpoint(a) for a in addresses]}]
    return body


def lower(mesh: Mesh) -> list[dict]:
    """One ClusterLoadAssignment per EDS cluster, unsorted."""
    return [
        {"@type": ENDPOINTS, **assignment(cluster_name(port.number, service.fqdn, version), addresses)}
        for service in mesh.services
        for port in service.ports
        for version, addresses in subsets(service)
        if not is_dns(addresses)
    ]


def _lb_endpoint(address: Address) -> dict:
    socket = {"address": address.host, "port_value": address.port}
    return {"endpoint": {"address": {"socket_address": socket}}}


def _unique(addresses: tuple[Address, ...]) -> tuple[Address, ...]:
    return tuple(dict.fromkeys(addresses))
