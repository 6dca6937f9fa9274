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
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf import json_format
from envoy.service.discovery.v3 import discovery_pb2

from compiler.xds import protos
from compiler.xds.consistency import consistency_errors
from compiler.xds.resources import SECRET, TYPE_URLS, content_version

__all__ = [
    "KINDS", "NAMED_BODIES_LIMIT", "PUSH_ORDER", "SCOPED_RESPONSE_BYTES", "SHARED_RESPONSE_BYTES", "TYPE_URLS", "WILDCARD_KINDS",
    "NamedBodies", "SharedResponses",
    "Resource", "Snapshot",
    "SERVED_ORDER", "SnapshotError", "TypeSnapshot", "consistency_errors", "content_version", "environment_dirs",
    "OPTIONAL_FILES", "files_digest",
    "kind_of", "load_snapshot", "packed_resource", "read_files", "resource", "type_snapshot", "written_version",
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
#: Bytes of whole responses one kind of one snapshot keeps for the streams in step (`SharedResponses`).
SHARED_RESPONSE_BYTES = 16 * 1024 * 1024
#: The same for all proxy scopes of one snapshot together, per kind (compiler.xds.scope).
SCOPED_RESPONSE_BYTES = 1024 * 1024


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
    source: bytes = b""  # SHA-256 of the resource's canonical JSON in its file: the same is this resource again
    parts: tuple[tuple[bytes, bytes], ...] = ()  # a route configuration's virtual hosts: (source hash, wire bytes)


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

    def get(self, names: frozenset[str] | None, build: Callable[[frozenset[str] | None], bytes]) -> bytes:
        """The body for `names` (None: every resource), from `build(names)` the first time."""
        body = self._bodies.get(names)
        if body is None:
            body = build(names)
            if self.limit:
                if len(self._bodies) >= self.limit:
                    del self._bodies[next(iter(self._bodies))]
                self._bodies[names] = body
        return body

    def __len__(self) -> int:
        return len(self._bodies)


class SharedResponses:
    """Whole responses, nonce included, that streams in step share.

    A stream's nonces count its responses, so proxies that subscribed alike count alike,
    and one push to a thousand of them is one response: one bytes object, not a thousand
    copies of a 770 KB route configuration each made and freed again (what a push spent
    most of its time on). Bounded by `limit` bytes; past it the oldest go first (a
    response dropped is built again). Event loop only; dies with its snapshot.
    """

    __slots__ = ("_bodies", "_size", "limit")

    def __init__(self, limit: int = SHARED_RESPONSE_BYTES) -> None:
        self._bodies: dict[object, bytes] = {}
        self._size = 0
        self.limit = limit

    def get(self, key, build: Callable[[], bytes]) -> bytes:
        """The response for `key` (everything that makes it: nonce, names), from `build()`
        the first time."""
        body = self._bodies.get(key)
        if body is None:
            body = build()
            if len(body) > self.limit:  # kept by nobody: what is kept stays
                return body
            while self._bodies and self._size + len(body) > self.limit:
                self._size -= len(self._bodies.pop(next(iter(self._bodies))))
            self._bodies[key] = body
            self._size += len(body)
        return body


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one kind; `version` is the file's `version_info` (a content hash)."""

    kind: str
    type_url: str
    version: str
    resources: Mapping[str, Resource]   # sorted by name
    header: bytes                       # DiscoveryResponse{version_info, type_url}
    named: NamedBodies = field(default_factory=NamedBodies, compare=False, repr=False)
    file_digest: bytes = b""            # SHA-256 of the file it was loaded from
    # Whole responses for streams in step, keyed by everything that makes them (this kind's
    # version among it: a proxy scope's kinds share one per snapshot and kind).
    shared: SharedResponses = field(default_factory=SharedResponses, compare=False, repr=False)

    def sotw_body(self, names: frozenset[str] | None) -> bytes:
        """`header` plus the resources named (all of them for None), without a nonce.

        The body of a name set is built once per snapshot (see `NamedBodies`)."""
        return self.named.get(names, self._body)

    def _body(self, names: frozenset[str] | None) -> bytes:
        if names is None:
            return self.header + b"".join(r.sotw_field for r in self.resources.values())
        return self.header + b"".join(self.resources[n].sotw_field
                                      for n in sorted(names) if n in self.resources)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An environment's four kinds, complete and consistent, and (once the server adds them)
    the secrets it serves beside them. `digest` hashes the four files' bytes."""

    env: str
    digest: str
    kinds: Mapping[str, TypeSnapshot]
    scopes: object = None    # compiler.xds.scope.Scopes: what a proxy of one service receives; None: no scopes

    def kind_for(self, service: str, kind: str) -> TypeSnapshot | None:
        """The resources of `kind` a proxy of `service` ("" when it does not say) receives."""
        typed = self.kinds.get(kind)
        if typed is None or self.scopes is None or not service:
            return typed
        return self.scopes.kind(service, kind, typed)

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


#: Beside the four: `envoy/scopes.json`, what a proxy of one service receives (`scope`);
#: a rendered tree from before it has none.
OPTIONAL_FILES: tuple[str, ...] = ("scopes",)


def read_files(envoy_dir: Path) -> dict[str, bytes]:
    """The raw bytes of the four files, and of the optional ones there are; OSError if one of
    the four is missing or unreadable.

    All are read through one open handle on the directory, so a compile
    that swaps `rendered/<env>` in the middle cannot hand us a mix of two trees.
    """
    out = {}
    directory = os.open(envoy_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for kind in PUSH_ORDER + OPTIONAL_FILES:
            try:
                fd = os.open(f"{kind}.json", os.O_RDONLY, dir_fd=directory)
            except FileNotFoundError:
                if kind in OPTIONAL_FILES:
                    continue
                raise
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
    for kind in PUSH_ORDER + OPTIONAL_FILES:
        if kind in files:
            sha.update(kind.encode() + b"\0" + hashlib.sha256(files[kind]).digest())
    return sha.hexdigest()


def load_snapshot(env: str, files: Mapping[str, bytes], previous: Snapshot | None = None,
                  others: Sequence[Snapshot] = ()) -> Snapshot:
    """Parse and check the four files' bytes; SnapshotError lists every problem.

    With `previous` (the environment's served snapshot), a file whose bytes are unchanged
    is its kind again, and inside a changed file a resource whose canonical JSON is
    unchanged is its resource again: only what changed is parsed strictly and serialised.
    `others` (other environments' snapshots) are reused the same way: environments mostly
    differ in their endpoints, and a resource is the same whatever environment holds it.
    The consistency check still runs over the whole snapshot.
    """
    problems: list[str] = []
    kinds: dict[str, TypeSnapshot] = {}
    for kind in PUSH_ORDER:
        before = [s.kinds[kind] for s in (previous, *others) if s is not None and kind in s.kinds]
        try:
            kinds[kind] = _load_kind(kind, files[kind], before)
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


def _load_kind(kind: str, data: bytes, before: Sequence[TypeSnapshot] = ()) -> TypeSnapshot:
    """One file: the first of `before` loaded from the same bytes, else parsed, reusing the
    resources (and virtual hosts) of `before` whose canonical JSON is unchanged."""
    where = f"{kind}.json"
    digest = hashlib.sha256(data).digest()
    for typed in before:
        if typed.file_digest == digest:
            return typed

    def fail(message: str) -> _FileProblems:
        return _FileProblems([f"{where}: {message}"])

    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise fail("not a JSON object")
    type_url = TYPE_URLS[kind]
    unknown = sorted(set(document) - {"version_info", "type_url", "resources"})
    if unknown:
        raise fail(f"unknown field {unknown[0]!r} in the DiscoveryResponse")
    if document.get("type_url") != type_url:
        raise fail(f"type_url is {document.get('type_url')!r}, expected {type_url!r}")
    version = document.get("version_info")
    if not isinstance(version, str) or not version:
        raise fail("version_info is empty")
    items = document.get("resources", [])
    if not isinstance(items, list):
        raise fail("resources is not a list")
    if version != written_version(data) and version != content_version(type_url, items):
        raise fail(f"version_info {version[:12]}… is not the SHA-256 of the rest of "
                   f"the file: edited by hand, or not written by meshc compile")
    known = {r.source: r for typed in before for r in typed.resources.values()}
    parts = {h: data for typed in before for r in typed.resources.values() for h, data in r.parts}
    problems, resources = [], {}
    cls = protos.message_class(type_url)
    for index, item in enumerate(items):
        source = _source(item)
        reused = known.get(source)
        if reused is not None:
            name = reused.name
        else:
            try:
                name, reused = _parse_resource(kind, type_url, cls, item, source, parts)
            except protos.ParseError as exc:
                problems.append(f"{where}: resources[{index}]: {exc}")
                continue
        if not name:
            problems.append(f"{where}: resources[{index}] has no name")
        elif name in resources:
            problems.append(f"{where}: two resources named {name!r}")
        else:
            resources[name] = reused
    if problems:
        raise _FileProblems(problems)
    return replace(type_snapshot(kind, type_url, version, resources), file_digest=digest)


def _source(item) -> bytes:
    return hashlib.sha256(json.dumps(item, sort_keys=True, separators=(",", ":")).encode()).digest()


def _parse_resource(kind: str, type_url: str, cls, item, source: bytes,
                    parts: Mapping[bytes, bytes]) -> tuple[str, Resource]:
    """One resource of a file, parsed strictly: (name, Resource). A route configuration is
    parsed virtual host by virtual host, taking the wire bytes of each one `parts` already
    holds (the one route configuration of a port holds every service's: a change to one
    service's routes parses that service's virtual host only). Its `json` is the file's own."""
    if not isinstance(item, dict):
        raise protos.ParseError("not a JSON object")
    if item.get("@type") != type_url:
        raise protos.ParseError(f"has @type {item.get('@type')!r}")
    hosts = item.get("virtual_hosts") if kind == "routes" else None
    if not isinstance(hosts, list):
        msg = protos.parse_strict({k: v for k, v in item.items() if k != "@type"}, cls)
        own: tuple = ()
    else:
        msg = protos.parse_strict({k: v for k, v in item.items() if k not in ("@type", "virtual_hosts")}, cls)
        own = tuple(_virtual_host(host, parts) for host in hosts)
        for _, data in own:
            msg.virtual_hosts.add().MergeFromString(data)
    name = msg.cluster_name if kind == "endpoints" else msg.name
    return name, replace(resource(name, msg, item), source=source, parts=own)


_VIRTUAL_HOST = "type.googleapis.com/envoy.config.route.v3.VirtualHost"


def _virtual_host(host, parts: Mapping[bytes, bytes]) -> tuple[bytes, bytes]:
    key = _source(host)
    data = parts.get(key)
    if data is None:
        if not isinstance(host, dict):
            raise protos.ParseError("a virtual host is not a JSON object")
        data = protos.parse_strict(host, protos.message_class(_VIRTUAL_HOST)).SerializeToString(deterministic=True)
    return key, data


_VERSION_TAIL = b',\n  "version_info": "'


def written_version(data: bytes) -> str:
    """The version a file written by `resources.versioned_json` has: the SHA-256 of its
    own text before `version_info`, closed as that text was hashed. Read off the bytes, no
    re-serialising; "" for a file laid out otherwise (then `content_version` decides)."""
    cut = data.rfind(_VERSION_TAIL)
    if cut < 0:
        return ""
    digest = hashlib.sha256(data[:cut])
    digest.update(b"\n}\n")
    return digest.hexdigest()


def type_snapshot(kind: str, type_url: str, version: str, resources: Mapping[str, Resource],
                  **memos) -> TypeSnapshot:
    """One kind's resources (sorted by name here) with its response header; `memos`: its
    `named` and `shared`, when not its own."""
    ordered = {name: resources[name] for name in sorted(resources)}
    header = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url).SerializeToString()
    return TypeSnapshot(kind=kind, type_url=type_url, version=version, resources=ordered, header=header, **memos)


def resource(name: str, msg, shown: dict | None = None) -> Resource:
    """One resource's wire forms; its `json` is `shown` (the file's own proto3 JSON, already
    parsed; a secret's without its private key), else the message's."""
    if shown is None:
        shown = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return packed_resource(name, protos.pack(msg), shown)


def packed_resource(name: str, packed, shown: dict) -> Resource:
    """`resource` of a message already packed in an Any (its value the deterministic bytes)."""
    version = hashlib.sha256(packed.value).hexdigest()
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(resources=[discovery_pb2.Resource(
        name=name, version=version, resource=packed)]).SerializeToString()
    return Resource(name=name, version=version, json={"@type": packed.type_url, **shown}, sotw_field=sotw,
                    delta_field=delta)
