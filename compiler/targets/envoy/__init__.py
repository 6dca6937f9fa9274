"""The Envoy target: a `Mesh` → four xDS DiscoveryResponse files.

Lowering runs in two steps, so the pipeline can compute services in parallel
and reuse them from its cache. `lower_service` turns one service into a
fragment: its clusters, ClusterLoadAssignments and virtual hosts, each
serialised once as an `emit.Piece`, its TCP proxies and the diagnostics it
raises on its own. `assemble` builds an environment's files from every
service's fragment, without the model and without parsing a piece: route
configurations and listeners per port, what the target cannot express between
services (shared short names, an ingress port that is also a service port) and
the files `envoy/{clusters,endpoints,listeners,routes}.json`, with
`envoy/scopes.json` beside them where a service has `egress`: what a proxy of
such a service receives (`scopes`). What `check`
refuses (two services on one TCP port, two claims of one ingress host, an
ingress without an HTTP port) never reaches it; where it would matter, an
assertion says so.

The consistency check (`compiler.xds.consistency.consistency_errors`, the one
the xDS server runs) runs in two halves that together cover the whole
snapshot: `lower_service` checks that every reference inside a service's
resources resolves among that service's own resources (all of which reach the
snapshot), and `assemble` checks what it adds (listeners → route
configurations and TCP proxy clusters) and that no two resources share a name.

Each file is `{"version_info", "type_url", "resources"}`: listeners and
route configurations sorted by name; clusters and assignments by service
(mesh order), then by name, so a service's resources read as one block.
`version_info` is the SHA-256 of the rest of the file
(`compiler.xds.resources.content_version`), so equal content means equal
versions on every machine.

A fragment (every list in the service's order unless said otherwise):

    {"service": "namespace/name",
     "clusters": {"names": [name], "piece": Piece([Cluster]) | None},      # each sorted by name
     "endpoints": {"names": [cluster_name], "piece": Piece([ClusterLoadAssignment]) | None},
     "http": [{"port": int, "name": str, "domains": [str], "virtual_host": Piece(VirtualHost)}],
                                        # domains sorted, short names included
     "tcp": [{"port": int, "tcp_proxy": TcpProxy}],
     "ingress": null | {"port": int, "hosts": [host], "paths": [prefix],
                 "blocks": [[prefix | null, [Route]]]},   # plain data: gateway.plan orders them
     "mirrored": [cluster_name],        # other services' clusters its routes mirror to, sorted
     "egress": null | [entry],          # what it calls ("ns/name" | "ns/*"), as written: see `scopes`
     "problems": [problem],             # {"code", "message", "severity", "span"}
     "spans": {"service", "ingress_port": [path, line, col] | null, "ports": {"PORT": [path, line, col] | null}}}

Fragments share values with one another and with the files built from them:
nothing downstream may mutate either.
"""

from __future__ import annotations

from collections import Counter
from operator import itemgetter

from compiler.diagnostics import Diagnostics
from compiler.emit import Deferred, Lowered, OutputFile, Piece
from compiler.errors import InconsistentSnapshot
from compiler.model import Environment, Mesh, Service
from compiler.targets.envoy import clusters, endpoints, listeners, patches, routes, scopes
from compiler.targets.envoy.common import diagnostic, span_of
from compiler.xds.consistency import consistency_errors
from compiler.xds.resources import TYPE_URLS, discovery_response

__all__ = ["NAME", "InconsistentSnapshot", "assemble", "lower", "lower_service"]

NAME = "envoy"
# The depth pieces land at in a file: a resource is an item of its `resources`; a
# virtual host an item of a route configuration's `virtual_hosts`.
RESOURCE_DEPTH, VIRTUAL_HOST_DEPTH = 2, 4


def lower(mesh: Mesh) -> Lowered:
    """The four Envoy files of one environment, and what the target could not express.

    Raises InconsistentSnapshot when the resources do not reference each
    other consistently (a bug here, never a user's mistake).
    """
    return assemble(mesh.environment, [lower_service(s, mesh.environment) for s in mesh.services])


def lower_service(service: Service, env: Environment) -> dict:
    """One service's fragment (see the module docstring): a pure function of the service.

    Raises InconsistentSnapshot when the service's resources do not reference
    each other consistently. Nothing else here depends on `env` (the listener
    address is applied by `assemble`).
    """
    upstreams = endpoints.upstreams(service)
    cluster_list, problems = clusters.lower(service, upstreams)
    assignments = endpoints.lower(upstreams)
    http, ingress = routes.lower(service)
    tcp = listeners.lower(service)
    mirrored = routes.mirrored_elsewhere(service)
    _check_service(env, service, cluster_list + [{"name": n} for n in mirrored], assignments, http, ingress, tcp)
    return {
        "service": service.key,
        "clusters": _run(cluster_list, "name"),
        "endpoints": _run(assignments, "cluster_name"),
        "http": [{"port": e["port"], "name": e["virtual_host"]["name"], "domains": e["virtual_host"]["domains"],
                  "virtual_host": Piece.json(e["virtual_host"], VIRTUAL_HOST_DEPTH)} for e in http],
        "tcp": tcp,
        "ingress": ingress,
        "mirrored": mirrored,
        "egress": list(service.egress) if service.egress is not None else None,
        "problems": problems,
        "spans": {"service": span_of(service), "ingress_port": span_of(service, "ingress", "port"),
                  "ports": {str(p.number): span_of(service, "ports", i, "port") for i, p in enumerate(service.ports)}},
    }


def _run(resources: list[dict], name_key: str) -> dict:
    """A service's resources of one type, sorted by name, as one piece."""
    resources = sorted(resources, key=itemgetter(name_key))
    return {"names": [r[name_key] for r in resources], "piece": Piece.json_items(resources, RESOURCE_DEPTH)}


def _check_service(env: Environment, service: Service, cluster_list, assignments, http, ingress, tcp) -> None:
    """Every reference inside one service's resources resolves among them (and the clusters
    of other services it mirrors to, which `assemble` checks)."""
    hosts = [e["virtual_host"] for e in http]
    if ingress is not None:
        hosts += [{"name": f"gateway {prefix or '(the rest)'}", "routes": routes} for prefix, routes in ingress["blocks"]]
    problems = consistency_errors({
        "clusters": cluster_list,
        "endpoints": assignments,
        "routes": [{"name": service.key, "virtual_hosts": hosts}],
        "listeners": [{"name": f"{service.key} TCP {e['port']}",
                       "filter_chains": [{"filters": [{"typed_config": e["tcp_proxy"]}]}]} for e in tcp],
    })
    if problems:
        raise InconsistentSnapshot(env.name, problems)


def assemble(env: Environment, fragments: list[dict]) -> Lowered:
    """The environment's four files from every service's fragment, in mesh order.

    Raises InconsistentSnapshot when a listener names a route configuration or
    cluster that does not exist, or two resources of one type share a name.
    """
    route_list, route_problems = routes.assemble(fragments)
    listener_list, listener_problems = listeners.assemble(env.envoy.listener_address, fragments)
    route_list.sort(key=itemgetter("name"))
    listener_list.sort(key=itemgetter("name"))
    names = {"clusters": [n for f in fragments for n in f["clusters"]["names"]],
             "endpoints": [n for f in fragments for n in f["endpoints"]["names"]],
             "listeners": [r["name"] for r in listener_list], "routes": [r["name"] for r in route_list]}
    # Each service's own references were checked by lower_service; these are the ones assembly adds.
    problems = consistency_errors({"listeners": listener_list,
                                   "routes": [{"name": n} for n in names["routes"]],
                                   "clusters": [{"name": n} for n in names["clusters"]]}) + _duplicates(names)
    clusters_here = set(names["clusters"])
    problems += [f"{f['service']}: mirror cluster {n!r} does not exist" for f in fragments for n in f["mirrored"]
                 if n not in clusters_here]
    if problems:
        raise InconsistentSnapshot(env.name, problems)
    resources = {
        "clusters": [f["clusters"]["piece"] for f in fragments if f["clusters"]["piece"] is not None],
        "endpoints": [f["endpoints"]["piece"] for f in fragments if f["endpoints"]["piece"] is not None],
        "listeners": listener_list,
        "routes": route_list,
    }
    patch_problems = Diagnostics()
    resources = patches.apply(env.patches, resources, RESOURCE_DEPTH, patch_problems)
    files = tuple(OutputFile(f"envoy/{kind}.json", Deferred(discovery_response, TYPE_URLS[kind], items), "json")
                  for kind, items in sorted(resources.items()))
    if any(f["egress"] is not None for f in fragments):
        files += (OutputFile(scopes.PATH, scopes.scopes_file(env.envoy.listener_address, fragments), "json"),)
    service_problems = [diagnostic(p) for f in fragments for p in f["problems"]]
    return Lowered(files, tuple(service_problems + route_problems + listener_problems + list(patch_problems)))


def _duplicates(names: dict[str, list[str]]) -> list[str]:
    """Two resources of one type with one name: Envoy would keep only one of them."""
    problems = []
    for kind, items in sorted(names.items()):
        if len(set(items)) == len(items):
            continue
        problems += [f"{kind}: two resources named {n!r}" for n, c in sorted(Counter(items).items()) if c > 1]
    return problems
