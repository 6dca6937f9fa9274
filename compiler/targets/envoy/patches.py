"""An environment's patches on Envoy resources: RFC 6902 ops on a resource by kind and name.

`target: {kind: Cluster | ClusterLoadAssignment | Listener | RouteConfiguration, name: NAME}`,
named as in `envoy/*.json`. Each patch is applied to the assembled snapshot in the order
written, then the patched resource must still parse strictly into its xds-protos type (the
parse `meshc serve` runs) and the snapshot must stay consistent (the check the server runs);
otherwise the patch is a located error and nothing is written. Only a resource a patch
touches is parsed and serialised again: the rest stay the pieces they were. An environment
without Envoy patches never imports protobuf.
"""

from __future__ import annotations

from compiler.diagnostics import Diagnostics, did_you_mean
from compiler.emit import Piece, plain
from compiler.model import ENVOY_PATCH_KINDS, Patch
from compiler.xds.consistency import consistency_errors
from compiler.xds.resources import TYPE_URLS

#: Patch kind → (file kind, the field that names a resource).
_KINDS = {"Cluster": ("clusters", "name"), "ClusterLoadAssignment": ("endpoints", "cluster_name"),
          "Listener": ("listeners", "name"), "RouteConfiguration": ("routes", "name")}
assert set(_KINDS) == set(ENVOY_PATCH_KINDS)


def apply(patches: tuple[Patch, ...], resources: dict[str, list], depth: int, diags: Diagnostics) -> dict[str, list]:
    """`resources` (file kind → items: resources, or pieces holding runs of them at `depth`)
    with every Envoy patch applied; a patch that cannot apply is reported and changes nothing."""
    mine = [p for p in patches if p.target.kind in _KINDS]
    if not mine:
        return resources
    from google.protobuf import any_pb2  # protobuf and every xDS type: only for an environment with Envoy patches

    from compiler.xds import protos

    resources = {kind: list(items) for kind, items in resources.items()}
    for patch in mine:
        kind, key = _KINDS[patch.target.kind]
        where = f"patch {patch.index + 1}: {patch.target.kind} {patch.target.name!r}"
        if patch.target.namespace is not None:
            diags.error("patch.namespace", f"{where}: Envoy resources have no namespace; name the resource alone",
                        patch.spans.at(("target", "namespace")))
            continue
        found = _find(resources[kind], key, patch.target.name)
        if found is None:
            names = [r[key] for item in resources[kind] for r in _items(item)]
            diags.error("patch.no-target", f"{where}: no {kind[:-1] if kind != 'endpoints' else 'assignment'} has that "
                        f"name{did_you_mean(patch.target.name, names)}", patch.spans.at(("target",)))
            continue
        position, index, resource = found
        patched = _patched(resource, patch, where, diags)
        if patched is None:
            continue
        try:
            if patched.get("@type") != TYPE_URLS[kind]:
                raise protos.ParseError(f"its @type must stay {TYPE_URLS[kind]}")
            protos.parse_strict(patched, any_pb2.Any)  # as the server parses it: an Any, nested Anys resolved
        except protos.ParseError as exc:
            diags.error("patch.invalid-resource", f"{where}: the patched resource is not a valid {patch.target.kind}: {exc}",
                        patch.spans.at(("ops",)))
            continue
        trial = {**resources, kind: _replaced(resources[kind], position, index, patched, depth)}
        before = set(consistency_errors(_plain(resources)))
        broken = [p for p in consistency_errors(_plain(trial)) if p not in before]
        if broken:
            diags.error("patch.inconsistent", f"{where}: the patched snapshot would be inconsistent: {broken[0]}",
                        patch.spans.at(("ops",)))
            continue
        resources = trial
    return resources


def _items(item) -> list:
    if type(item) is Piece:
        return item.value if item.many else [item.value]
    return [item]


def _find(items: list, key: str, name: str):
    """(position in `items`, index inside a run, the resource as plain data), or None."""
    for position, item in enumerate(items):
        for index, resource in enumerate(_items(item)):
            if resource.get(key) == name:
                return position, index, plain(resource)
    return None


def _patched(resource: dict, patch: Patch, where: str, diags: Diagnostics) -> dict | None:
    import jsonpatch

    for n, op in enumerate(patch.ops):
        try:
            resource = jsonpatch.JsonPatch([op]).apply(resource)  # a copy: the piece stays as it was
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            diags.error("patch.op-failed", f"{where}, op {n + 1} ({op['op']} {op['path']}) failed: {exc}",
                        patch.spans.at(("ops", n)))
            return None
    return resource


def _replaced(items: list, position: int, index: int, resource: dict, depth: int) -> list:
    """`items` with one resource replaced; a run of several is serialised again as a run."""
    items = list(items)
    item = items[position]
    if type(item) is Piece and item.many:
        run = list(item.value)
        run[index] = resource
        items[position] = Piece.json_items(run, depth)
    else:
        items[position] = resource
    return items


def _plain(resources: dict[str, list]) -> dict[str, list]:
    return {kind: [r for item in items for r in _items(plain(item) if type(item) is not Piece else item)]
            for kind, items in resources.items()}
