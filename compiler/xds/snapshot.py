"""Snapshots: one environment's four emitted Envoy files, parsed strictly and checked.

Owns loading `rendered/<env>/envoy/{clusters,endpoints,listeners,routes}.json`,
the strict parse of every resource into its xds-protos type, the version
rule (`resources.content_version`), running the one consistency check (defined in
`consistency`), and the
wire bytes every response is assembled from, computed once per snapshot (the
bodies of named subscriptions once per name set, on first use).

A snapshot is immutable. Loading either returns a complete `Snapshot` or
raises `SnapshotError` carrying every problem found; there is no partial
snapshot, which is what keeps a half-written file away from proxies.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds import protos
from compiler.xds.consistency import consistency_errors
from compiler.xds.resources import SECRET, TYPE_URLS, content_version

__all__ = [
    "KINDS", "NAMED_BODIES_LIMIT", "PUSH_ORDER", "TYPE_URLS", "WILDCARD_KINDS", "NamedBodies",
    "Resource", "Snapshot",
    "SERVED_ORDER", "SnapshotError", "TypeSnapshot", "consistency_errors", "content_version", "environment_dirs",
    "files_digest",
    "kind_of", "load_snapshot", "read_files", "resource", "type_snapshot",
]

#: The kinds served: the four files', and the secrets `meshc serve --secrets` reads from disk.
_KIND_BY_URL = {url: kind for kind, url in {**TYPE_URLS, "secrets": SECRET}.items()}

#: Make-before-break: a cluster exists before its endpoints, a listener before
#: its routes, and clusters before the routes and listeners that name them.
#: https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol#eventual-consistency-considerations
PUSH_ORDER: tuple[str, ...] = ("clusters", "endpoints", "listeners", "routes")
KINDS = PUSH_ORDER
#: What a push sends, in order: a secret before the clusters and listeners that use it.
SERVED_ORDER: tuple[str, ...] = ("secrets",) + PUSH_ORDER
#: CDS and LDS are wildcard subscriptions; RDS and EDS name their resources.
WILDCARD_KINDS = frozenset({"clusters", "listeners"})

_MAX_FILE_BYTES = 64 * 1024 * 1024
#: Distinct named subscriptions whose bodies one kind of one snapshot remembers.
NAMED_BODIES_LIMIT = 256


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


class NamedBodies:
    """Response bodies of named subscriptions (RDS, EDS), memoised by name set.

    Building a body sorts and joins the named resources; every later push or
    poll for the same names is a dict lookup. At most `limit` name sets are
    kept per kind and snapshot, the oldest dropped first. Used from the event
    loop only; a snapshot's memo dies with the snapshot.
    """

    __slots__ = ("_bodies", "limit")

    def __init__(self, limit: int = NAMED_BODIES_LIMIT) -> None:
        self._bodies: dict[frozenset[str], bytes] = {}
        self.limit = limit

    def get(self, names: frozenset[str], build: Callable[[frozenset[str]], bytes]) -> bytes:
        """The body for `names`, from `build(names)` the first time."""
        body = self._bodies.get(names)
        if body is None:
            if len(self._bodies) >= self.limit:
                del self._bodies[next(iter(self._bodies))]
            body = self._bodies[names] = build(names)
        return body

    def __len__(self) -> int:
        return len(self._bodies)


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one kind; `version` is the file's `version_info` (a content hash)."""

    kind: str
    type_url: str
    version: str
    resources: Mapping[str, Resource]   # sorted by name
    header: bytes                       # DiscoveryResponse{version_info, type_url}
    full_body: bytes                    # header + every resource's sotw_field, in name order
    named: NamedBodies = field(default_factory=NamedBodies, compare=False, repr=False)

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """`header` plus the resources named (all of them for None), without a nonce.

        The body of a name set is built once per snapshot (see `NamedBodies`)."""
        if names is None:
            return self.full_body
        return self.named.get(names, self._named_body)

    def _named_body(self, names: frozenset[str]) -> bytes:
        return self.header + b"".join(self.resources[n].sotw_field
                                      for n in sorted(names) if n in self.resources)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An environment's four kinds, complete and consistent, and (once the server adds them)
    the secrets it serves beside them. `digest` hashes the four files' bytes."""

    env: str
    digest: str
    kinds: Mapping[str, TypeSnapshot]

    def versions(self) -> dict[str, str]:
        return {kind: self.kinds[kind].version for kind in PUSH_ORDER}


def environment_dirs(rendered: Path) -> list[Path]:
    """`rendered/<env>/envoy` for every environment, sorted; hidden names (a
    compiler's staging or old copy, `.prod.new-*`) are not environments."""
    try:
        names = sorted(entry.name for entry in os.scandir(rendered))
    except OSError:         # the directory itself is gone or unreadable: no environments
        return []
    return [rendered / name / "envoy" for name in names
            if not name.startswith(".") and (rendered / name / "envoy").is_dir()]


def read_files(envoy_dir: Path) -> dict[str, bytes]:
    """The raw bytes of the four files; OSError if one is missing or unreadable.

    All four are read through one open handle on the directory, so a compile
    that swaps `rendered/<env>` in the middle cannot hand us a mix of two trees.
    """
    out = {}
    directory = os.open(envoy_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for kind in PUSH_ORDER:
            fd = os.open(f"{kind}.json", os.O_RDONLY, dir_fd=directory)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(_MAX_FILE_BYTES + 1)
            if len(data) > _MAX_FILE_BYTES:
                raise OSError(f"{kind}.json: larger than {_MAX_FILE_BYTES} bytes")
            out[kind] = data
    finally:
        os.close(directory)
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
    if response.version_info != content_version(type_url, document.get("resources", [])):
        raise fail(f"version_info {response.version_info[:12]}… is not the SHA-256 of the rest of "
                   f"the file: edited by hand, or not written by meshc compile")
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
            resources[name] = resource(name, msg)
    if problems:
        raise _FileProblems(problems)
    return type_snapshot(kind, type_url, response.version_info, resources)


def type_snapshot(kind: str, type_url: str, version: str, resources: Mapping[str, Resource]) -> TypeSnapshot:
    """One kind's resources (sorted by name here) with its response header and full body."""
    ordered = {name: resources[name] for name in sorted(resources)}
    header = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url).SerializeToString()
    return TypeSnapshot(kind=kind, type_url=type_url, version=version, resources=ordered, header=header,
                        full_body=header + b"".join(r.sotw_field for r in ordered.values()))


def resource(name: str, msg, shown: dict | None = None) -> Resource:
    """One resource's wire forms; its `json` is the message's, or `shown` for one that must
    not be shown whole (a secret's private key)."""
    packed = protos.pack(msg)
    version = hashlib.sha256(packed.value).hexdigest()
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[discovery_pb2.Resource(
        name=name, version=version, resource=packed)]).SerializeToString()
    as_json = shown if shown is not None else json_format.MessageToDict(msg, preserving_proto_field_name=True)
    as_json = {"@type": packed.type_url, **as_json}
    return Resource(name=name, version=version, json=as_json, sotw_field=sotw, delta_field=delta)
