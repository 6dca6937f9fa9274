"""Proxy scope: what a proxy of a service with `egress` receives (DESIGN.md, "Proxy scope").

A proxy whose node metadata names its service (`{"service": "ns/name"}`) gets,
when that service has `egress`, only the listeners, routes, clusters and
endpoints of what it calls, as Istio's Sidecar `egress.hosts` gives a sidecar.
`meshc serve` cuts that view out of the environment's snapshot by the names in
`envoy/scopes.json`, which this module writes when some service has `egress`:

    {"egress":   {"ns/name": ["ns/name" | "ns/*"]},          # each service with `egress`, as written
     "services": {"ns/name": {"clusters": [name], "endpoints": [name],
                              "listeners": [name], "routes": {"PORT": [virtual host]}}},
     "version_info": SHA-256 of the rest (compiler.xds.resources.file_version)}

`services` holds each service some `egress` entry covers: what a caller needs
of it. Its clusters and assignments include those of other services its routes
mirror to; its listeners are its ports' (a caller's sidecar listens on the
ports it calls, never the gateway's); `routes` names, per route configuration
(one per HTTP port), its virtual hosts there. A scoped proxy receives each of
those route configurations with the virtual hosts of its callees only.
Resources an environment's patches add belong to no service: unscoped proxies
get them.
"""

from __future__ import annotations

from compiler.targets.envoy.common import listener_name
from compiler.xds.resources import versioned_json

PATH = "envoy/scopes.json"


def scopes_file(address: str, fragments: list[dict]) -> bytes:
    egress = {f["service"]: f["egress"] for f in fragments if f["egress"] is not None}
    exact = {entry for entries in egress.values() for entry in entries if not entry.endswith("/*")}
    namespaces = {entry[:-2] for entries in egress.values() for entry in entries if entry.endswith("/*")}
    assignments = {n for f in fragments for n in f["endpoints"]["names"]}
    services = {}
    for f in fragments:
        key = f["service"]
        if key not in exact and key.split("/")[0] not in namespaces:
            continue
        mirrored = f["mirrored"]
        ports = sorted({e["port"] for e in f["http"]} | {e["port"] for e in f["tcp"]})
        routes: dict[str, list[str]] = {}
        for e in f["http"]:
            routes.setdefault(str(e["port"]), []).append(e["name"])
        services[key] = {"clusters": f["clusters"]["names"] + mirrored,
                         "endpoints": f["endpoints"]["names"] + [n for n in mirrored if n in assignments],
                         "listeners": [listener_name(address, p) for p in ports],
                         "routes": {port: sorted(names) for port, names in sorted(routes.items())}}
    return versioned_json({"egress": {k: sorted(v) for k, v in sorted(egress.items())}, "services": dict(sorted(services.items()))})
