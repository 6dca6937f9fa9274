"""The Envoy target: a `Mesh` → four xDS DiscoveryResponse files.

Lowering runs in two steps, so the pipeline can compute services in parallel
and reuse them from its cache. `lower_service` turns one service into a
fragment of plain JSON data: its clusters, ClusterLoadAssignments, virtual
hosts, TCP proxies and the diagnostics it raises on its own. `assemble`
builds an environment's files from every service's fragment, without the
model: route configurations and listeners per port, the checks between
services (shared ports, shared short names, ingress clashes), the consistency
check (`compiler.xds.consistency.consistency_errors`, the one the xDS server
runs), and the files `envoy/{clusters,endpoints,listeners,routes}.json`.

Each file is `{"version_info", "type_url", "resources"}` with resources
sorted by name and `version_info` the SHA-256 of the canonical JSON of its
resources, so equal content means equal versions on every machine.

A fragment (every list in the service's order unless said otherwise):

    {"service": "namespace/name",
     "clusters": [Cluster], "endpoints": [ClusterLoadAssignment],
     "http": [{"port": int, "virtual_host": VirtualHost}],   # domains sorted, short names included
     "tcp": [{"port": int, "tcp_proxy": TcpProxy}],
     "ingress": null | {"port": int, "virtual_hosts": [[host, VirtualHost]]}
                     | {"port": int, "virtual_hosts": null, "problem": problem},  # no HTTP port
     "problems": [problem],             # {"code", "message", "severity", "span"}
     "spans": {"service", "ports", "ingress_port", "ingress_hosts": [path, line, col] | null}}

Fragments share nested values with one another and with the files built
from them: nothing downstream may mutate either.
"""

from __future__ import annotations

from collections import Counter
from operator import itemgetter

from compiler.model import Environment, Mesh, Service
from compiler.targets import Lowered, OutputFile
from compiler.targets.envoy import clusters, endpoints, listeners, routes
from compiler.targets.envoy.common import CLUSTER, ENDPOINTS, LISTENER, ROUTES, diagnostic, span_of
from compiler.xds.consistency import consistency_errors, content_version

__all__ = ["NAME", "InconsistentSnapshot", "assemble", "lower", "lower_service"]

NAME = "envoy"
_TYPE_URLS = {"clusters": CLUSTER, "endpoints": ENDPOINTS, "listeners": LISTENER, "routes": ROUTES}
_NAME_KEYS = {"clusters": "name", "endpoints": "cluster_name", "listeners": "name", "routes": "name"}


class InconsistentSnapshot(AssertionError):
    """A compiler bug: the lowered resources refer to something that is not there."""

    def __init__(self, environment: str, problems: list[str]) -> None:
        super().__init__(f"envoy snapshot for {environment!r} is inconsistent:\n  " + "\n  ".join(problems))
        self.problems = tuple(problems)


def lower(mesh: Mesh) -> Lowered:
    """The four Envoy files of one environment, and what the target could not express.

    Raises InconsistentSnapshot when the resources do not reference each
    other consistently (a bug here, never a user's mistake).
    """
    return assemble(mesh.environment, [lower_service(s, mesh.environment) for s in mesh.services])


def lower_service(service: Service, env: Environment) -> dict:
    """One service's fragment (see the module docstring): a pure function of the service, JSON-able.

    `env` is part of the targets' contract; nothing here depends on it (the
    listener address is applied by `assemble`).
    """
    upstreams = endpoints.upstreams(service)
    cluster_list, problems = clusters.lower(service, upstreams)
    http, ingress = routes.lower(service)
    return {
        "service": service.key,
        "clusters": cluster_list,
        "endpoints": endpoints.lower(upstreams),
        "http": http,
        "tcp": listeners.lower(service),
        "ingress": ingress,
        "problems": problems,
        "spans": {"service": span_of(service), "ports": span_of(service, "ports"),
                  "ingress_port": span_of(service, "ingress", "port"),
                  "ingress_hosts": span_of(service, "ingress", "hosts")},
    }


def assemble(env: Environment, fragments: list[dict]) -> Lowered:
    """The environment's four files from every service's fragment, in mesh order.

    Raises InconsistentSnapshot as `lower` does.
    """
    route_list, route_problems = routes.assemble(fragments)
    listener_list, listener_problems = listeners.assemble(env.envoy.listener_address, fragments)
    resources = {
        "clusters": _sorted([c for f in fragments for c in f["clusters"]], "clusters"),
        "endpoints": _sorted([e for f in fragments for e in f["endpoints"]], "endpoints"),
        "listeners": _sorted(listener_list, "listeners"),
        "routes": _sorted(route_list, "routes"),
    }
    problems = consistency_errors(resources) + _duplicates(resources)
    if problems:
        raise InconsistentSnapshot(env.name, problems)
    files = tuple(OutputFile(f"envoy/{kind}.json", discovery_response(_TYPE_URLS[kind], items), "json")
                  for kind, items in sorted(resources.items()))
    service_problems = [diagnostic(p) for f in fragments for p in f["problems"]]
    return Lowered(files, tuple(service_problems + route_problems + listener_problems))


def discovery_response(type_url: str, resources: list[dict]) -> dict:
    """DiscoveryResponse JSON; `version_info` is the content hash the xDS server checks."""
    return {"version_info": content_version(resources), "type_url": type_url, "resources": resources}


def _sorted(resources: list[dict], kind: str) -> list[dict]:
    resources.sort(key=itemgetter(_NAME_KEYS[kind]))
    return resources


def _duplicates(resources: dict[str, list[dict]]) -> list[str]:
    """Two resources of one type with one name: Envoy would keep only one of them."""
    problems = []
    for kind, items in sorted(resources.items()):
        key = _NAME_KEYS[kind]
        if len({r[key] for r in items}) == len(items):
            continue
        counts = Counter(r[key] for r in items)
        problems += [f"{kind}: two resources named {n!r}" for n, c in sorted(counts.items()) if c > 1]
    return problems
