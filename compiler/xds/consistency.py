"""The snapshot consistency check: every reference between resources resolves.

Pure dict walking over proto3 JSON, no protobuf and no I/O, so the compiler's
Envoy target runs the same check before it writes that `meshc serve` runs
before it publishes. Re-exported by `compiler.xds.snapshot`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from compiler.xds.resources import HCM as _HCM
from compiler.xds.resources import TCP_PROXY as _TCP_PROXY

__all__ = ["consistency_errors"]


def consistency_errors(resources: Mapping[str, Sequence[dict]]) -> list[str]:
    """Every dangling reference in a snapshot, as one human-readable line each.

    `resources` maps "clusters", "endpoints", "listeners", "routes" (missing
    keys mean none) to proto3-JSON dicts with snake_case field names, as the
    Envoy target emits them. Checked, in this order:

    - every RDS route configuration a listener's HTTP connection manager names
      (in any filter chain, including `default_filter_chain`) exists;
    - every cluster a route names (`route.cluster`, `weighted_clusters`,
      `request_mirror_policies`), in RDS or inline `route_config`, exists, and
      so does every TCP proxy cluster (plain and weighted). go-control-plane's
      `Consistent()` skips these; Envoy answers them with 503 NC at run time;
    - every EDS cluster has a ClusterLoadAssignment (named by
      `eds_cluster_config.service_name`, else by the cluster's own name).

    Pure dict walking: no protobuf, no I/O. The list is sorted, empty when
    the snapshot is consistent.
    """
    clusters = {c.get("name") for c in resources.get("clusters", ())}
    assignments = {e.get("cluster_name") for e in resources.get("endpoints", ())}
    route_configs = {r.get("name") for r in resources.get("routes", ())}
    problems: list[str] = []

    for listener in resources.get("listeners", ()):
        where = f"listener {listener.get('name')!r}"
        for config in _network_filters(listener):
            url = config.get("@type")
            if url == _HCM:
                rds = config.get("rds")
                if rds is not None and rds.get("route_config_name") not in route_configs:
                    problems.append(f"{where}: route configuration "
                                    f"{rds.get('route_config_name')!r} does not exist")
                inline = config.get("route_config")
                if inline is not None:
                    problems += _route_problems(inline, clusters, f"{where} inline routes")
            elif url == _TCP_PROXY:
                for name in _tcp_clusters(config):
                    if name not in clusters:
                        problems.append(f"{where}: tcp_proxy cluster {name!r} does not exist")

    for config in resources.get("routes", ()):
        problems += _route_problems(config, clusters, f"route configuration {config.get('name')!r}")

    for cluster in resources.get("clusters", ()):
        if cluster.get("type") == "EDS":
            service = (cluster.get("eds_cluster_config") or {}).get("service_name") or cluster.get("name")
            if service not in assignments:
                problems.append(f"cluster {cluster.get('name')!r}: EDS cluster has no "
                                f"ClusterLoadAssignment {service!r}")
    return sorted(problems)


def _network_filters(listener: dict) -> Iterator[dict]:
    chains = list(listener.get("filter_chains") or ())
    if listener.get("default_filter_chain"):
        chains.append(listener["default_filter_chain"])
    for chain in chains:
        for network_filter in chain.get("filters") or ():
            config = network_filter.get("typed_config")
            if isinstance(config, dict):
                yield config


def _tcp_clusters(config: dict) -> Iterator[str]:
    if "cluster" in config:
        yield config["cluster"]
    for weighted in (config.get("weighted_clusters") or {}).get("clusters") or ():
        yield weighted.get("name")


def _route_problems(config: dict, clusters: set, where: str) -> list[str]:
    problems = []
    for host in config.get("virtual_hosts") or ():
        for index, route in enumerate(host.get("routes") or ()):
            action = route.get("route")
            if not isinstance(action, dict):
                continue        # redirect, direct_response, filter_action: no cluster
            for name in _route_clusters(action):
                if name not in clusters:
                    problems.append(f"{where}: virtual host {host.get('name')!r} "
                                    f"routes[{index}] names cluster {name!r}, "
                                    f"which does not exist")
    return problems


def _route_clusters(action: dict) -> Iterator[str]:
    if "cluster" in action:
        yield action["cluster"]
    for weighted in (action.get("weighted_clusters") or {}).get("clusters") or ():
        yield weighted.get("name")
    for mirror in action.get("request_mirror_policies") or ():
        if "cluster" in mirror:
            yield mirror["cluster"]

