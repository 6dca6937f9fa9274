"""Proxy scope: the part of a snapshot a proxy of one service receives.

A proxy names its service in its node metadata (`{"service": "ns/name"}`).
When `envoy/scopes.json` (written by `compiler.targets.envoy.scopes`, which
documents it) gives that service an `egress`, the proxy receives only the
listeners, clusters and endpoints of what it calls, and each route
configuration with only their virtual hosts; otherwise, or when the proxy does
not say, the whole environment.

A scoped kind is a `TypeSnapshot` like any other: its version hashes the names
and versions of what it holds, so it changes only when something in the scope
does, and a push that touches nothing a proxy calls sends it nothing (SotW
included). Scoped kinds are built on first use, once per snapshot and service;
one whose content is the previous snapshot's is that object again (with its
memoised bodies), and a trimmed route configuration is built once per set of
virtual hosts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace

from google.protobuf import any_pb2

from compiler.xds import protos
from compiler.xds.resources import ROUTES, file_version
from compiler.xds.snapshot import (SCOPED_RESPONSE_BYTES, NamedBodies, Resource, SharedResponses, Snapshot,
                                   SnapshotError, TypeSnapshot, packed_resource, type_snapshot,
                                   written_version)

__all__ = ["FILE", "Scopes", "ScopeError", "attach", "load_scopes"]

FILE = "scopes"           # envoy/scopes.json
_KINDS = ("clusters", "endpoints", "listeners", "routes")


class ScopeError(Exception):
    """`envoy/scopes.json` is not what the compiler writes."""


class Scopes:
    """One snapshot's scopes: `egress` by service, what each called service brings, and the
    scoped kinds built so far."""

    def __init__(self, egress: Mapping[str, tuple[str, ...]], services: Mapping[str, dict],
                 previous: "Scopes | None" = None, changed: Mapping[str, frozenset[str]] | None = None,
                 data: bytes = b"") -> None:
        """`changed`: per kind, the names whose resource is not the previous snapshot's;
        `data`: the file's bytes, so a reload of the same bytes is not parsed again."""
        self.egress = egress
        self.services = services
        self.data = data
        self._built: dict[tuple[str, str], TypeSnapshot] = {}
        self._shared: dict[str, SharedResponses] = {}
        self._callees: dict[str, list[tuple[str, dict]]] = {}
        self._callee_names: dict[tuple[str, str], frozenset[str]] = {}
        self._by_namespace: dict[str, list[str]] | None = None
        # What the previous snapshot's scopes built, and from what: plain data, so a chain of
        # snapshots does not keep every older one alive.
        self._previous = previous._built if previous is not None else {}
        self._previous_callees = previous._callees if previous is not None else {}
        self._changed = changed
        self._routes = previous._routes if previous is not None else {}  # (name, top, hosts) → Resource
        if previous is not None and previous.services is services and previous.egress is egress:
            self._callees, self._callee_names = previous._callees, previous._callee_names   # the same file
        self._layout: dict[bytes, _Layout] = {}  # by a route configuration's source hash

    def kind(self, service: str, kind: str, full: TypeSnapshot) -> TypeSnapshot:
        """`full` as a proxy of `service` receives it (all of it without a scope)."""
        if kind not in _KINDS or service not in self.egress:
            return full
        built = self._built.get((service, kind))
        if built is None:
            built = self._built[(service, kind)] = self._build(service, kind, full)
        return built

    def callees(self, service: str) -> list[tuple[str, dict]]:
        """What `service` calls, each with what `services` says of it, in name order."""
        found = self._callees.get(service)
        if found is None:
            if self._by_namespace is None:
                self._by_namespace = {}
                for key in self.services:
                    self._by_namespace.setdefault(key.split("/")[0], []).append(key)
            keys = set()
            for entry in self.egress[service]:
                if entry.endswith("/*"):
                    keys.update(self._by_namespace.get(entry[:-2], ()))
                elif entry in self.services:
                    keys.add(entry)
            found = self._callees[service] = [(k, self.services[k]) for k in sorted(keys)]
        return found

    def _unchanged(self, service: str, kind: str) -> TypeSnapshot | None:
        """The previous snapshot's build, when nothing it was made of changed: the same callees,
        described alike, and none of their resources of `kind` new (every other kind but routes,
        whose one configuration per port changes with any service's virtual hosts)."""
        before = self._previous.get((service, kind))
        if before is None or self._changed is None or kind == "routes":
            return None
        callees = self.callees(service)
        if self._previous_callees.get(service) != callees:
            return None
        changed = self._changed.get(kind)
        if changed and not changed.isdisjoint(self._names(service, kind)):
            return None
        return before

    def _names(self, service: str, kind: str) -> frozenset[str]:
        """The names of `kind` (not routes) that `service`'s callees bring."""
        key = (service, kind)
        found = self._callee_names.get(key)
        if found is None:
            found = self._callee_names[key] = frozenset(n for _, callee in self.callees(service) for n in callee[kind])
        return found

    def _build(self, service: str, kind: str, full: TypeSnapshot) -> TypeSnapshot:
        reused = self._unchanged(service, kind)
        if reused is not None:
            return reused
        callees = self.callees(service)
        if kind == "routes":
            hosts: dict[str, set[str]] = {}
            for _, callee in callees:
                for name, names in callee["routes"].items():
                    hosts.setdefault(name, set()).update(names)
            chosen = {n: self._route(full.resources[n], frozenset(h)) for n, h in hosts.items() if n in full.resources}
        else:
            chosen = {n: full.resources[n] for _, callee in callees for n in callee[kind] if n in full.resources}
        version = hashlib.sha256("".join(f"{n}\0{chosen[n].version}\n" for n in sorted(chosen)).encode()).hexdigest()
        before = self._previous.get((service, kind))
        if before is not None and before.version == version:
            return before
        # Most services have a proxy or a few: a body of their own would be kept for one
        # stream. Their responses share one bounded memo per kind instead.
        return type_snapshot(kind, full.type_url, version, chosen, named=NamedBodies(limit=0),
                             shared=self._shared.setdefault(kind, SharedResponses(SCOPED_RESPONSE_BYTES)))

    def _route(self, config: Resource, hosts: frozenset[str]) -> Resource:
        """`config` with only the virtual hosts named `hosts`, built once per choice."""
        layout = self._layout.get(config.source)
        if layout is None:
            layout = self._layout[config.source] = _Layout(config)
        keep = sorted(layout.positions[n] for n in hosts if n in layout.positions)
        if len(keep) == len(config.parts):
            return config
        # Not keyed on the whole configuration: another service's virtual host changing leaves
        # this choice, and so the proxies that make it, as they were.
        key = (config.name, layout.key, tuple(config.parts[i][0] for i in keep))
        trimmed = self._routes.get(key)
        if trimmed is None:
            value = layout.head + b"".join(_virtual_hosts_field(config.parts[i][1]) for i in keep) + layout.tail
            shown = {**layout.top, "virtual_hosts": [config.json["virtual_hosts"][i] for i in keep]}
            packed = any_pb2.Any(type_url=config.json["@type"], value=value)
            trimmed = replace(packed_resource(config.name, packed, shown), parts=tuple(config.parts[i] for i in keep))
            if len(self._routes) > 65536:  # one per distinct choice in use; a bound against churn
                self._routes.clear()
            self._routes[key] = trimmed
        return trimmed


_VIRTUAL_HOSTS = protos.message_class(ROUTES).DESCRIPTOR.fields_by_name["virtual_hosts"].number
assert _VIRTUAL_HOSTS < 16, "its tag is one byte"


class _Layout:
    """A route configuration's virtual hosts by name, and the rest of it as the bytes that go
    before and after its virtual hosts: the deterministic serialisation, fields in number
    order, of the configuration with any choice of its virtual hosts is head + theirs + tail."""

    __slots__ = ("positions", "top", "key", "head", "tail")

    def __init__(self, config: Resource) -> None:
        self.positions = {host.get("name"): i for i, host in enumerate(config.json.get("virtual_hosts", ()))}
        self.top = {k: v for k, v in config.json.items() if k not in ("@type", "virtual_hosts")}
        self.key = json.dumps(self.top, sort_keys=True)
        tail = protos.parse_strict(self.top, protos.message_class(ROUTES))
        head = type(tail)()
        head.CopyFrom(tail)
        for field, _ in tail.ListFields():
            (tail if field.number < _VIRTUAL_HOSTS else head).ClearField(field.name)
        self.head, self.tail = head.SerializeToString(deterministic=True), tail.SerializeToString(deterministic=True)


def _virtual_hosts_field(data: bytes) -> bytes:
    """`data` (one VirtualHost's bytes) as a RouteConfiguration's virtual_hosts entry."""
    size, prefix = len(data), bytearray([_VIRTUAL_HOSTS << 3 | 2])  # length-delimited; one tag byte below 16
    while size > 0x7F:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + data


def attach(snapshot: Snapshot, data: bytes | None, previous: Snapshot | None = None,
           others: Sequence[Snapshot] = ()) -> Snapshot:
    """`snapshot` with the scopes of its `envoy/scopes.json` bytes (None: the file is not
    there); SnapshotError when they do not parse, so the environment keeps what it served.
    The same bytes in `others` (other environments' snapshots) are read once."""
    before = previous.scopes if previous is not None else None
    changed = None
    if before is not None:
        changed = {kind: _changed(previous.kinds[kind], snapshot.kinds[kind]) for kind in _KINDS}
    try:
        scopes = load_scopes(data, before, changed, [o.scopes for o in others if o.scopes is not None])
    except ScopeError as exc:
        raise SnapshotError(snapshot.env, [f"{FILE}.json: {exc}"]) from None
    return replace(snapshot, scopes=scopes)


def _changed(before: TypeSnapshot, after: TypeSnapshot) -> frozenset[str]:
    """Names whose resource is not the same object (a reload reuses what it did not change)."""
    if before is after:
        return frozenset()
    a, b = before.resources, after.resources
    return frozenset([n for n, r in b.items() if a.get(n) is not r] + [n for n in a if n not in b])


def load_scopes(data: bytes | None, previous: Scopes | None = None,
                changed: Mapping[str, frozenset[str]] | None = None, others: Sequence[Scopes] = ()) -> Scopes | None:
    """Parse `envoy/scopes.json` (None when the compiler wrote none: no proxy is scoped);
    the same bytes as `previous`'s or one of `others`' are taken as that one read them."""
    if data is None:
        return None
    for known in ([previous] if previous is not None else []) + list(others):
        if known.data == data:     # checked when it was first read
            return Scopes(known.egress, known.services, previous, changed, data)
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScopeError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != {"egress", "services", "version_info"}:
        raise ScopeError("not an object of egress, services and version_info")
    version = document.pop("version_info")
    if version != written_version(data) and version != file_version(document):
        raise ScopeError(f"version_info {str(version)[:12]}… is not the SHA-256 of the rest of the file: "
                         "edited by hand, or not written by meshc compile")
    egress, services = document["egress"], document["services"]
    if not isinstance(egress, dict) or not all(isinstance(v, list) and all(isinstance(e, str) for e in v)
                                               for v in egress.values()):
        raise ScopeError("egress is not a map of service to a list of names")
    if not isinstance(services, dict) or not all(_is_entry(v) for v in services.values()):
        raise ScopeError("services is not a map of service to its clusters, endpoints, listeners and routes")
    return Scopes({k: tuple(v) for k, v in egress.items()}, services, previous, changed, data)


def _is_entry(value) -> bool:
    names = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
    return (isinstance(value, dict) and set(value) == set(_KINDS) and all(names(value[k]) for k in _KINDS[:3])
            and isinstance(value["routes"], dict) and all(names(v) for v in value["routes"].values()))
