"""Resource-level changes between two renders of one environment.

Istio files are multi-document YAML: documents are keyed `Kind namespace/name`.
Envoy files are DiscoveryResponses: resources are keyed by their `name` (or
`cluster_name`). A modified resource becomes a list of field changes from
`jsonpatch.make_patch`, after list items that carry a key are turned into
mapping entries (`[v2]` for a route to subset v2, `[default]` for the route
named default), so a path reads `spec.http[default].route[v2].weight` and an
insertion does not renumber everything after it. Only files whose bytes
differ are parsed. Pure: bytes in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Iterator, Mapping

import jsonpatch
import orjson
import yaml

# Only rendered output is read here: compiler.emit wrote it for YAML 1.1 readers (quoting
# "on", "yes", ...), so PyYAML reads it back exactly. Inputs go through compiler.load.
try:
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML without libyaml
    _Loader = yaml.SafeLoader

KUSTOMIZATION = "kustomization.yaml"  # its resource list follows the files below: not reported
# The files of rendered/<env>/envoy/ (compiler.targets.envoy): file stem → what its resources are.
ENVOY_KINDS = {"listeners": "listener", "routes": "route configuration",
               "clusters": "cluster", "endpoints": "endpoints"}
ORDER = "#order"  # pseudo-key holding a keyed list's order, so a pure reordering still shows


class Change(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    MODIFIED = "modified"


@dataclass(frozen=True)
class FieldChange:
    path: str  # "spec.http[default].route[v2].weight"
    op: str  # "add" | "remove" | "replace" | "reorder"
    old: object = None
    new: object = None


@dataclass(frozen=True)
class ResourceChange:
    key: str  # "VirtualService bookinfo/reviews" | "cluster outbound|9080|v2|reviews.bookinfo.svc.cluster.local"
    file: str  # path under rendered/<env>/
    change: Change
    fields: tuple[FieldChange, ...] = ()


def diff_outputs(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> tuple[list[ResourceChange], list[ResourceChange]]:
    """(Istio/Kubernetes changes, Envoy changes) between two renders of one environment."""
    istio: list[ResourceChange] = []
    envoy: list[ResourceChange] = []
    for rel in sorted(set(old) | set(new)):
        a, b = old.get(rel), new.get(rel)
        if a == b or rel == KUSTOMIZATION:
            continue
        if rel.endswith(".json"):
            envoy += _changes(rel, _envoy_resources(rel, a), _envoy_resources(rel, b))
        else:
            istio += _changes(rel, _yaml_documents(a), _yaml_documents(b))
    return istio, envoy


def field_changes(old, new) -> list[FieldChange]:
    """The field-level difference of two JSON-like values, keyed list items named."""
    a, b = _align(old, new)
    changes = []
    for op in jsonpatch.make_patch(a, b).patch:
        path = op["path"]
        if op["op"] == "remove":
            changes.append(FieldChange(_dotted(path), "remove", old=_at(a, path)))
        elif op["op"] in ("add", "copy"):
            changes.append(FieldChange(_dotted(path), "add", new=_at(b, path)))
        elif op["op"] == "replace":
            changes.append(FieldChange(_dotted(path), "replace", _at(a, path), op["value"]))
        elif op["op"] == "move":
            changes.append(FieldChange(_dotted(op["from"]), "remove", old=_at(a, op["from"])))
            changes.append(FieldChange(_dotted(path), "add", new=_at(b, path)))
    return [_reorder(c) for c in changes]


def references(files: Mapping[str, bytes], fqdn: str, subset: str) -> list[str]:
    """Where a render still names `subset` of `fqdn`: Istio destinations and Envoy clusters."""
    cluster_part = f"|{subset}|{fqdn}".encode()
    found = []
    for rel, data in sorted(files.items()):
        if rel.endswith(".json"):
            if cluster_part in data:
                found.append(rel)
        elif subset.encode() in data and fqdn.split(".")[0].encode() in data:
            if any(_names_subset(doc, fqdn, subset) for doc in yaml.load_all(data, Loader=_Loader)):
                found.append(rel)
    return found


# --- parsing -------------------------------------------------------------------------------

def _yaml_documents(data: bytes | None) -> dict[str, dict]:
    if data is None:
        return {}
    docs = {}
    for doc in yaml.load_all(data, Loader=_Loader):
        if isinstance(doc, dict):
            meta = doc.get("metadata") or {}
            where = f"{meta['namespace']}/{meta.get('name')}" if meta.get("namespace") else str(meta.get("name"))
            docs[f"{doc.get('kind')} {where}"] = doc
    return docs


def _envoy_resources(rel: str, data: bytes | None) -> dict[str, dict]:
    if data is None:
        return {}
    kind = ENVOY_KINDS.get(rel.rsplit("/", 1)[-1].removesuffix(".json"), "resource")
    out = {}
    for i, res in enumerate(orjson.loads(data).get("resources", [])):
        name = res.get("name") or res.get("cluster_name") or f"#{i}"
        out[f"{kind} {name}"] = res
    return out


def _changes(rel: str, old: dict[str, dict], new: dict[str, dict]) -> Iterator[ResourceChange]:
    for key in sorted(set(old) | set(new)):
        if key not in old:
            yield ResourceChange(key, rel, Change.ADDED)
        elif key not in new:
            yield ResourceChange(key, rel, Change.REMOVED)
        elif old[key] != new[key]:
            yield ResourceChange(key, rel, Change.MODIFIED, tuple(field_changes(old[key], new[key])))


# --- keyed lists ---------------------------------------------------------------------------

def _item_key(item) -> str | None:
    """The name a list item goes by, where the resource gives it one."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("name"), (str, int)):
        return str(item["name"])
    dest = item.get("destination")
    if isinstance(dest, dict):  # an Istio route destination: by subset, else host
        return str(dest.get("subset") or dest.get("host"))
    addr = (item.get("endpoint") or {}).get("address", {}).get("socket_address")
    if isinstance(addr, dict):  # an Envoy lb_endpoint: by address
        return f"{addr.get('address')}:{addr.get('port_value')}"
    port = item.get("port")
    if isinstance(port, dict) and port.get("name"):  # a Gateway server
        return str(port["name"])
    return None


def _align(a, b):
    """The parts of `a` and `b` that differ, keyed lists turned into mappings.

    Equal entries are dropped on both sides, so jsonpatch walks only what
    changed (a route configuration holds every service's virtual host). A
    keyed list becomes `{"[key]": item}`, plus `ORDER` (the key order, as a
    tuple jsonpatch compares whole) when the same items were only reordered.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        pa, pb = {}, {}
        for k in sorted(a.keys() | b.keys()):
            x, y = a.get(k, _MISSING), b.get(k, _MISSING)
            if x == y:
                continue
            if x is _MISSING:
                pb[k] = y
            elif y is _MISSING:
                pa[k] = x
            else:
                pa[k], pb[k] = _align(x, y)
        return pa, pb
    if isinstance(a, list) and isinstance(b, list):
        ka, kb = _keys(a), _keys(b)
        if ka is None or kb is None:
            return a, b
        pa, pb = _align({f"[{k}]": x for k, x in zip(ka, a)}, {f"[{k}]": y for k, y in zip(kb, b)})
        if ka != kb and sorted(ka) == sorted(kb):
            pa[ORDER], pb[ORDER] = tuple(ka), tuple(kb)
        return pa, pb
    return a, b


def _keys(items: list) -> list[str] | None:
    """Each item's key, or None when some item has none or two share one."""
    keys = [_item_key(x) for x in items]
    return keys if items and None not in keys and len(set(keys)) == len(keys) else None


_MISSING = object()


def _reorder(change: FieldChange) -> FieldChange:
    if change.path.endswith(ORDER):
        return FieldChange(change.path[: -len(ORDER) - 1] or "(root)", "reorder", list(change.old), list(change.new))
    return change


def _names_subset(value, fqdn: str, subset: str) -> bool:
    if isinstance(value, dict):
        host = value.get("host")
        if value.get("subset") == subset and isinstance(host, str) and (host == fqdn or fqdn.startswith(host + ".")):
            return True
        return any(_names_subset(v, fqdn, subset) for v in value.values())
    if isinstance(value, list):
        return any(_names_subset(v, fqdn, subset) for v in value)
    return False


# --- JSON pointers -------------------------------------------------------------------------

def _tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]


def _at(doc, pointer: str):
    for token in _tokens(pointer):
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    return doc


def _dotted(pointer: str) -> str:
    out = ""
    for token in _tokens(pointer):
        if token.startswith("[") and token.endswith("]"):
            out += token
        elif token.isdigit():
            out += f"[{token}]"
        else:
            out += f".{token}" if out else token
    return out
