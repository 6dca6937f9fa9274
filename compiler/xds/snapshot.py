"""Snapshots: one environment's four emitted Envoy files, parsed strictly and checked.

Owns loading `rendered/<env>/envoy/{clusters,endpoints,listeners,routes}.json`,
the strict parse of every resource into its xds-protos type, the one
consistency check (`consistency_errors`, also called by the compiler's Envoy
target before it writes), and the wire bytes every response is assembled
from, computed once per snapshot.

A snapshot is immutable. Loading either returns a complete `Snapshot` or
raises `SnapshotError` carrying every problem found; there is no partial
snapshot, which is what keeps a half-written file away from proxies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds import protos

__all__ = [
    "KINDS", "PUSH_ORDER", "TYPE_URLS", "WILDCARD_KINDS", "Resource", "Snapshot",
    "SnapshotError", "TypeSnapshot", "consistency_errors", "content_version", "environment_dirs",
    "files_digest",
    "kind_of", "load_snapshot", "read_files",
]

#: Short kind (the file stem) → type URL.
TYPE_URLS: Mapping[str, str] = {
    "clusters": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "endpoints": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "listeners": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "routes": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}
_KIND_BY_URL = {url: kind for kind, url in TYPE_URLS.items()}

#: Make-before-break: a cluster exists before its endpoints, a listener before
#: its routes, and clusters before the routes and listeners that name them.
#: https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol#eventual-consistency-considerations
PUSH_ORDER: tuple[str, ...] = ("clusters", "endpoints", "listeners", "routes")
KINDS = PUSH_ORDER
#: CDS and LDS are wildcard subscriptions; RDS and EDS name their resources.
WILDCARD_KINDS = frozenset({"clusters", "listeners"})

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_MAX_FILE_BYTES = 64 * 1024 * 1024


def kind_of(type_url: str) -> str | None:
    """The short kind for a type URL, or None if this server does not serve it."""
    return _KIND_BY_URL.get(type_url)


class SnapshotError(Exception):
    """An environment's files do not make a servable snapshot; `problems` lists why."""

    def __init__(self, env: str, problems: Sequence[str]) -> None:
        super().__init__(f"{env}: " + "; ".join(problems))
        self.env = env
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource and its pre-serialised wire forms.

    `version` is the SHA-256 of the deterministic Any bytes (Delta's per-resource
    version); `sotw_field` and `delta_field` are the encoded `resources` entry of a
    DiscoveryResponse / DeltaDiscoveryResponse, so a response is a concatenation.
    """

    name: str
    version: str
    json: dict
    sotw_field: bytes
    delta_field: bytes


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one kind; `version` is the file's `version_info` (a content hash)."""

    kind: str
    type_url: str
    version: str
    resources: Mapping[str, Resource]   # sorted by name
    header: bytes                       # DiscoveryResponse{version_info, type_url}
    all_fields: bytes                   # every resource's sotw_field, in name order

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """`header` plus the resources named (all of them for None), without a nonce."""
        if names is None:
            return self.header + self.all_fields
        return self.header + b"".join(self.resources[n].sotw_field
                                      for n in sorted(names) if n in self.resources)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An environment's four kinds, complete and consistent. `digest` hashes the file bytes."""

    env: str
    digest: str
    kinds: Mapping[str, TypeSnapshot]

    def versions(self) -> dict[str, str]:
        return {kind: self.kinds[kind].version for kind in PUSH_ORDER}


def content_version(resources: Sequence[dict]) -> str:
    """The `version_info` of a kind: SHA-256 of its resources as canonical JSON
    (sorted keys, no spaces), the rule the Envoy target writes by. Recomputing it
    at load catches a hand edit or a file that does not match its own version."""
    canonical = json.dumps(list(resources), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def environment_dirs(rendered: Path) -> list[Path]:
    """`rendered/<env>/envoy` for every environment, sorted; hidden names (a
    compiler's staging or old copy, `.prod.new-*`) are not environments."""
    return [d for d in sorted(rendered.glob("*/envoy"))
            if not d.parent.name.startswith(".") and d.is_dir()]


def read_files(envoy_dir: Path) -> dict[str, bytes]:
    """The raw bytes of the four files; OSError if one is missing or unreadable."""
    out = {}
    for kind in PUSH_ORDER:
        path = envoy_dir / f"{kind}.json"
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES + 1)
        if len(data) > _MAX_FILE_BYTES:
            raise OSError(f"{path.name}: larger than {_MAX_FILE_BYTES} bytes")
        out[kind] = data
    return out


def files_digest(files: Mapping[str, bytes]) -> str:
    sha = hashlib.sha256()
    for kind in PUSH_ORDER:
        sha.update(kind.encode() + b"\0" + hashlib.sha256(files[kind]).digest())
    return sha.hexdigest()


def load_snapshot(env: str, files: Mapping[str, bytes]) -> Snapshot:
    """Parse and check the four files' bytes; SnapshotError lists every problem."""
    problems: list[str] = []
    kinds: dict[str, TypeSnapshot] = {}
    for kind in PUSH_ORDER:
        try:
            kinds[kind] = _load_kind(kind, files[kind])
        except _FileProblems as exc:
            problems.extend(exc.problems)
    if not problems:
        problems = consistency_errors({k: [r.json for r in t.resources.values()]
                                       for k, t in kinds.items()})
    if problems:
        raise SnapshotError(env, problems)
    return Snapshot(env=env, digest=files_digest(files), kinds=kinds)


class _FileProblems(Exception):
    """One file's problems, gathered into the SnapshotError of its environment."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


def _load_kind(kind: str, data: bytes) -> TypeSnapshot:
    where = f"{kind}.json"

    def fail(message: str) -> _FileProblems:
        return _FileProblems([f"{where}: {message}"])

    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise fail("not a JSON object")
    type_url = TYPE_URLS[kind]
    try:
        response = protos.parse_strict(document, discovery_pb2.DiscoveryResponse)
    except protos.ParseError as exc:
        raise fail(str(exc)) from None
    if response.type_url != type_url:
        raise fail(f"type_url is {response.type_url!r}, expected {type_url!r}")
    if not response.version_info:
        raise fail("version_info is empty")
    if response.version_info != content_version(document.get("resources", [])):
        raise fail(f"version_info {response.version_info[:12]}… is not the SHA-256 of the "
                   f"resources' canonical JSON: edited by hand, or not written by meshc compile")
    problems, resources = [], {}
    cls = protos.message_class(type_url)
    for index, packed in enumerate(response.resources):
        if packed.type_url != type_url:
            problems.append(f"{where}: resources[{index}] has @type {packed.type_url!r}")
            continue
        msg = cls()
        packed.Unpack(msg)
        name = msg.cluster_name if kind == "endpoints" else msg.name
        if not name:
            problems.append(f"{where}: resources[{index}] has no name")
        elif name in resources:
            problems.append(f"{where}: two resources named {name!r}")
        else:
            resources[name] = _resource(name, msg)
    if problems:
        raise _FileProblems(problems)
    ordered = {name: resources[name] for name in sorted(resources)}
    header = discovery_pb2.DiscoveryResponse(version_info=response.version_info,
                                             type_url=type_url).SerializeToString()
    return TypeSnapshot(kind=kind, type_url=type_url, version=response.version_info,
                        resources=ordered, header=header,
                        all_fields=b"".join(r.sotw_field for r in ordered.values()))


def _resource(name: str, msg) -> Resource:
    packed = protos.pack(msg)
    version = hashlib.sha256(packed.value).hexdigest()
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[discovery_pb2.Resource(
        name=name, version=version, resource=packed)]).SerializeToString()
    as_json = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    as_json = {"@type": packed.type_url, **as_json}
    return Resource(name=name, version=version, json=as_json, sotw_field=sotw, delta_field=delta)


# --- consistency -----------------------------------------------------------

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
