"""The Envoy target: a `Mesh` → four xDS DiscoveryResponse files.

`lower` builds clusters, endpoints, route configurations and listeners
(one module per resource type), checks that they refer to one another
consistently (`compiler.xds.snapshot.consistency_errors`, the check the xDS
server runs), and returns `envoy/{clusters,endpoints,listeners,routes}.json`.
Each file is `{"version_info", "type_url", "resources"}` with resources
sorted by name and `version_info` the SHA-256 of the canonical JSON of its
resources, so equal content means equal versions on every machine.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

from compiler.model import Mesh
from compiler.targets import Lowered, OutputFile
from compiler.targets.envoy import clusters, endpoints, listeners, routes
from compiler.targets.envoy.common import CLUSTER, ENDPOINTS, LISTENER, ROUTES
from compiler.xds.snapshot import consistency_errors

__all__ = ["NAME", "InconsistentSnapshot", "lower"]

NAME = "envoy"
_TYPE_URLS = {"clusters": CLUSTER, "endpoints": ENDPOINTS, "listeners": LISTENER, "routes": ROUTES}


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
    cluster_list, cluster_problems = clusters.lower(mesh)
    route_list, route_problems = routes.lower(mesh)
    listener_list, listener_problems = listeners.lower(mesh)
    resources = {
        "clusters": _sorted(cluster_list, "name"),
        "endpoints": _sorted(endpoints.lower(mesh), "cluster_name"),
        "listeners": _sorted(listener_list, "name"),
        "routes": _sorted(route_list, "name"),
    }
    problems = consistency_errors(resources) + _duplicates(resources)
    if problems:
        raise InconsistentSnapshot(mesh.environment.name, problems)
    files = tuple(OutputFile(f"envoy/{kind}.json", discovery_response(_TYPE_URLS[kind], items), "json")
                  for kind, items in sorted(resources.items()))
    return Lowered(files, tuple(cluster_problems + route_problems + listener_problems))


def discovery_response(type_url: str, resources: list[dict]) -> dict:
    """DiscoveryResponse JSON; `version_info` hashes the resources' canonical JSON."""
    canonical = json.dumps(resources, sort_keys=True, separators=(",", ":")).encode()
    return {"version_info": hashlib.sha256(canonical).hexdigest(), "type_url": type_url,
            "resources": resources}


def _sorted(resources: list[dict], key: str) -> list[dict]:
    return sorted(resources, key=lambda r: r[key])


def _duplicates(resources: dict[str, list[dict]]) -> list[str]:
    """Two resources of one type with one name: Envoy would keep only one of them."""
    problems = []
    for kind, items in sorted(resources.items()):
        key = "cluster_name" if kind == "endpoints" else "name"
        counts = Counter(r[key] for r in items)
        problems += [f"{kind}: two resources named {n!r}" for n, c in sorted(counts.items()) if c > 1]
    return problems
