"""The Istio target: model → Kubernetes Service, DestinationRule, VirtualService, Gateway.

One file per service, `istio/<namespace>/<name>.yaml`, holding its documents
in a fixed order (Service, DestinationRule, VirtualService, Gateway, ingress
VirtualService), then the environment's JSON patches, then a
`kustomization.yaml` listing every file so Argo CD and Flux apply exactly
those. Field names follow networking.istio.io/v1:
https://istio.io/latest/docs/reference/config/networking/
"""

from __future__ import annotations

from dataclasses import replace

from compiler import model as m
from compiler.diagnostics import Diagnostics
from compiler.emit import Lowered, OutputFile, Piece
from compiler.targets import gateway
from compiler.values import format_duration

NAME = "istio"
NETWORKING = "networking.istio.io/v1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshc"}


def lower(mesh: m.Mesh) -> Lowered:
    return assemble(mesh.environment, [lower_service(svc, mesh.environment) for svc in mesh.services])


def lower_service(svc: m.Service, env: m.Environment) -> dict:
    """One service's documents, in file order, and what it asks of the gateway:
    `{"identities": [[apiVersion, kind, name, namespace]], "documents": Piece, "ingress": null |
    {"name", "namespace", "port", "hosts", "paths", "blocks": [[prefix | null, [http route]]],
    "tls": null | {"mode", "credentialName"}, "httpsRedirect"}, "scope": {"fqdn", "selector", "egress": null | [entry],
    "credential": bool}}`. A pure function of the service and its environment, serialised once;
    its ingress objects depend on the host's other claimants, and its Sidecar and its callers'
    DestinationRules on what it calls (and what they call), so `assemble` writes them."""
    docs = service_objects(svc, env)
    return {"identities": [list(_identity(doc)) for doc in docs], "documents": Piece.yaml(docs), "ingress": _ingress(svc),
            "scope": {"fqdn": svc.fqdn, "selector": dict(svc.selector), "egress": list(svc.egress) if svc.egress is not None else None,
                      "credential": any(tls.sidecar_credential for _, tls in svc.tls_settings())}}


def assemble(env: m.Environment, fragments: list[dict]) -> Lowered:
    """The environment's files from each service's documents (in mesh order): ingress objects,
    patches, then kustomization.

    Generated names never collide: `check.claims` refuses the one way they could.
    """
    diags = Diagnostics()
    objects = {f"{f['identities'][0][3]}/{f['identities'][0][2]}": f for f in fragments}
    _add_ingress_objects(env, objects)
    _add_sidecars(objects)
    for patch in env.patches:
        if patch.target.kind not in m.ENVOY_PATCH_KINDS:  # those are the Envoy target's
            _apply_patch(patch, objects, diags)
    # A file's documents: the service's own piece, then what assembly added (plain documents,
    # rendered only if the file is serialised: a re-compile that knows it unchanged does not).
    files = [OutputFile(f"istio/{key}.yaml", [f["documents"], *f.get("added", ())], "yaml") for key, f in objects.items()]
    files.append(OutputFile("kustomization.yaml", [kustomization(f.path for f in files)], "yaml"))
    return Lowered(tuple(files), tuple(diags))


def service_objects(svc: m.Service, env: m.Environment) -> list[dict]:
    """Every object of one service, in file order: a service outside the mesh is a
    ServiceEntry and its DestinationRule."""
    if svc.external is not None:
        return [service_entry(svc)] + [dr for dr in [destination_rule(svc)] if dr]
    docs = [kube_service(svc)]
    dr = destination_rule(svc)
    if dr:
        docs.append(dr)
    docs.append(virtual_service(svc))  # every service has a port (the schema requires one)
    return docs


def _meta(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)}


# -- Service -------------------------------------------------------------------------------


def kube_service(svc: m.Service) -> dict:
    # appProtocol is how Istio learns a port's protocol without naming conventions.
    ports = [
        {"name": p.name, "port": p.number, "targetPort": p.target_port, "protocol": "TCP", "appProtocol": p.protocol.value.lower()}
        for p in svc.ports
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(svc.name, svc.namespace),
        "spec": {"selector": dict(svc.selector), "ports": ports},
    }


# -- ServiceEntry --------------------------------------------------------------------------


def service_entry(svc: m.Service) -> dict:
    """A host outside the mesh (MESH_EXTERNAL): resolved by DNS, or at the environment's
    endpoints (STATIC), each port where `model.port_address` says."""
    spec: dict = {
        "hosts": [svc.external.host],
        "location": "MESH_EXTERNAL",
        "ports": [{"number": p.number, "name": p.name, "protocol": p.protocol.value} for p in svc.ports],
        "resolution": svc.external.resolution,
    }
    if svc.external.resolution == "STATIC":
        spec["endpoints"] = [{"address": a.host, "ports": {p.name: m.port_address(a, p, svc.ports).port for p in svc.ports}}
                             for a in dict.fromkeys(svc.endpoints.all())]
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": _meta(svc.name, svc.namespace), "spec": spec}


# -- DestinationRule -----------------------------------------------------------------------


def destination_rule(svc: m.Service) -> dict | None:
    spec: dict = {"host": svc.fqdn}
    policy = traffic_policy(svc)
    if policy:
        spec["trafficPolicy"] = policy
    if svc.versions:
        spec["subsets"] = [_subset(v) for v in svc.versions]
    if len(spec) == 1:
        return None
    return {"apiVersion": NETWORKING, "kind": "DestinationRule", "metadata": _meta(svc.name, svc.namespace), "spec": spec}


def traffic_policy(svc: m.Service) -> dict:
    """The service's trafficPolicy: its own fields, and a `portLevelSettings` entry per port with a policy
    (in port order), which istiod uses instead of the rest on that port."""
    policy = _policy_fields(svc.policy)
    ports = [{"port": {"number": p.number}, **_policy_fields(p.policy)} for p in svc.ports if p.policy is not None]
    if ports:
        policy["portLevelSettings"] = ports
    return policy


def _subset(v: m.Version) -> dict:
    subset = {"name": v.name, "labels": dict(v.labels)}
    policy = _policy_fields(v.policy) if v.policy else {}
    if policy:  # an empty one changes nothing: istiod keeps every field of the service's
        subset["trafficPolicy"] = policy
    return subset


def _policy_fields(p: m.TrafficPolicy) -> dict:
    return _drop_none({
        "loadBalancer": _load_balancer(p.load_balancer) if p.load_balancer else None,
        "connectionPool": _connection_pool(p.connection_pool) if p.connection_pool else None,
        "outlierDetection": _outlier_detection(p.outlier_detection) if p.outlier_detection else None,
        "tls": _tls(p.tls) if p.tls else None,
    })


def _load_balancer(lb: m.LoadBalancer) -> dict:
    # `warmup` is the CRD's current field; `warmupDurationSecs` is deprecated in its favour.
    warmup = {"warmup": {"duration": _dur(lb.warmup_ms)}} if lb.warmup_ms is not None else {}
    if lb.simple:
        return {"simple": lb.simple.value, **warmup}
    ch = lb.consistent_hash
    if ch is None:
        return warmup  # the default balancer, warmed up
    if ch.on is m.HashOn.HEADER:
        return {"consistentHash": {"httpHeaderName": ch.header}}
    if ch.on is m.HashOn.COOKIE:
        cookie = _drop_none({"name": ch.cookie, "path": ch.cookie_path, "ttl": _dur(ch.cookie_ttl_ms)})
        return {"consistentHash": {"httpCookie": cookie}}
    return {"consistentHash": {"useSourceIp": True}}


def _connection_pool(cp: m.ConnectionPool) -> dict:
    keepalive = cp.tcp_keepalive
    tcp = _drop_none(
        {
            "maxConnections": cp.max_connections,
            "connectTimeout": _dur(cp.connect_timeout_ms),
            "tcpKeepalive": None if keepalive is None else _drop_none(
                {"time": _dur(keepalive.time_ms), "interval": _dur(keepalive.interval_ms), "probes": keepalive.probes}),
        }
    )
    http = _drop_none(
        {
            "http1MaxPendingRequests": cp.http1_max_pending_requests,
            "http2MaxRequests": cp.http2_max_requests,
            "maxRequestsPerConnection": cp.max_requests_per_connection,
            "maxRetries": cp.max_retries,
            "idleTimeout": _dur(cp.idle_timeout_ms),
            "h2UpgradePolicy": cp.h2_upgrade_policy.value if cp.h2_upgrade_policy else None,
        }
    )
    return _drop_none({"tcp": tcp or None, "http": http or None})


def _outlier_detection(od: m.OutlierDetection) -> dict:
    return _drop_none(
        {
            "consecutive5xxErrors": od.consecutive_5xx_errors,
            "interval": _dur(od.interval_ms),
            "baseEjectionTime": _dur(od.base_ejection_time_ms),
            "maxEjectionPercent": od.max_ejection_percent,
        }
    )


def _tls(tls: m.Tls) -> dict:
    return _drop_none(
        {
            "mode": tls.mode.value,
            "credentialName": tls.credential_name,
            "sni": tls.sni,
            "subjectAltNames": list(tls.subject_alt_names) or None,
        }
    )


# -- VirtualService ------------------------------------------------------------------------


def virtual_service(svc: m.Service) -> dict:
    spec: dict = {"hosts": [svc.fqdn]}
    http = [route for port in svc.http_ports for route in http_routes(svc, port, len(svc.http_ports) > 1)]
    tcp = [tcp_route(svc, port, len(svc.ports) > 1) for port in svc.ports if not port.is_http]
    if http:
        spec["http"] = http
    if tcp:
        spec["tcp"] = tcp
    return {"apiVersion": NETWORKING, "kind": "VirtualService", "metadata": _meta(svc.name, svc.namespace), "spec": spec}


def http_routes(svc: m.Service, port: m.Port, by_port: bool, dest_port: bool | None = None) -> list[dict]:
    """The service's HTTP routes (`svc.routes`, in order) for one port.

    With several HTTP ports each gets its own routes, matched by port and
    named `NAME-PORT`, so a destination never leaves its port to Istio's guess.
    """
    return [_http_route(svc, route, port, by_port, by_port if dest_port is None else dest_port) for route in svc.routes]


def _http_route(svc: m.Service, r: m.Route, port: m.Port, by_port: bool, dest_port: bool) -> dict:
    out: dict = {"name": f"{r.name}-{port.number}" if by_port else r.name}
    match = _match(r.match, port.number if by_port else None)
    if match:
        out["match"] = [match]
    if r.redirect:
        out["redirect"] = _redirect(r.redirect)
    elif r.direct_response:
        d = r.direct_response
        out["directResponse"] = _drop_none({"status": d.status, "body": {"string": d.body} if d.body is not None else None})
    else:
        out["route"] = _weighted(svc, r.traffic, port if dest_port else None)
        out.update(_drop_none({"rewrite": _rewrite(r.rewrite), "timeout": _dur(r.timeout_ms), "retries": _retries(r.retries),
                               "fault": _fault(r.fault)}))
        if r.mirror:
            mirror = {"host": r.mirror.fqdn, "subset": r.mirror.version, "port": {"number": port.number}}
            out["mirror"] = _drop_none(mirror)
            out["mirrorPercentage"] = {"value": r.mirror.percent}
    out.update(_drop_none({"headers": _headers(r.headers), "corsPolicy": _cors(r.cors)}))
    return out


def _match(match: m.RouteMatch, port: int | None) -> dict:
    out: dict = {}
    if match.path:
        out["uri"] = {match.path.kind.value: match.path.value}
    if match.methods:
        out["method"] = {"exact": match.methods[0]} if len(match.methods) == 1 else {"regex": "|".join(match.methods)}
    if match.headers:
        out["headers"] = {h.header: {} if h.kind is m.MatchKind.PRESENT else {h.kind.value: h.value} for h in match.headers}
    if match.query:
        out["queryParams"] = {q.name: {q.kind.value: q.value} for q in match.query}
    if port is not None:
        out["port"] = port
    return out


def _redirect(r: m.Redirect) -> dict:
    return _drop_none({"uri": r.path, "authority": r.host, "port": r.port, "scheme": r.scheme, "redirectCode": r.code})


def _rewrite(r: m.Rewrite | None) -> dict | None:
    if r is None:
        return None
    regex = {"match": r.regex, "rewrite": r.substitute} if r.regex is not None else None
    return _drop_none({"uri": r.prefix, "uriRegexRewrite": regex, "authority": r.authority})


def _fault(f: m.Fault | None) -> dict | None:
    if f is None:
        return None
    delay = {"fixedDelay": _dur(f.delay_ms), "percentage": {"value": f.delay_percent}} if f.delay_ms is not None else None
    abort = None
    if f.abort_status is not None or f.abort_grpc_status is not None:
        code = {"httpStatus": f.abort_status} if f.abort_status is not None else {"grpcStatus": f.abort_grpc_status}
        abort = {**code, "percentage": {"value": f.abort_percent}}
    return _drop_none({"delay": delay, "abort": abort})


def _headers(h: m.Headers | None) -> dict | None:
    if h is None:
        return None
    return _drop_none({"request": _header_ops(h.request), "response": _header_ops(h.response)}) or None


def _header_ops(ops: m.HeaderOps) -> dict | None:
    return _drop_none({"set": dict(ops.set) or None, "add": dict(ops.add) or None, "remove": list(ops.remove) or None}) or None


def _cors(c: m.Cors | None) -> dict | None:
    if c is None:
        return None
    return _drop_none({
        "allowOrigins": [{o.kind.value: o.value} for o in c.allow_origins] or None,
        "allowMethods": list(c.allow_methods) or None,
        "allowHeaders": list(c.allow_headers) or None,
        "exposeHeaders": list(c.expose_headers) or None,
        "maxAge": _dur(c.max_age_ms),
        "allowCredentials": c.allow_credentials,
    })


def tcp_route(svc: m.Service, port: m.Port, by_port: bool) -> dict:
    route: dict = {"route": _weighted(svc, svc.traffic, port)}
    if by_port:
        route["match"] = [{"port": port.number}]
    return route


def _weighted(svc: m.Service, t: m.Traffic, port: m.Port | None) -> list[dict]:
    """Route destinations by weight; a 0% entry is left out (Envoy's weighted clusters refuse zero)."""
    if t.shape is m.TrafficShape.NONE:
        return [{"destination": _destination(svc, None, port)}]
    live = [w for w in t.weights if w.weight > 0]
    if len(live) == 1:
        return [{"destination": _destination(svc, live[0].version, port)}]
    return [{"destination": _destination(svc, w.version, port), "weight": w.weight} for w in live]


def _destination(svc: m.Service, version: str | None, port: m.Port | None) -> dict:
    dest: dict = {"host": svc.fqdn}
    if version:
        dest["subset"] = version
    if port:
        dest["port"] = {"number": port.number}
    return dest


def _retries(r: m.Retries | None) -> dict | None:
    if r is None:
        return None
    return _drop_none(
        {
            "attempts": r.attempts,
            "perTryTimeout": _dur(r.per_try_timeout_ms),
            "retryOn": ",".join(r.retry_on) or None,
        }
    )


# -- ingress -------------------------------------------------------------------------------


def _ingress(svc: m.Service) -> dict | None:
    """What the service's ingress adds to the gateway's hosts (see `gateway`); None without one.
    A multi-port service is reached through the gateway on its first HTTP port."""
    ing = svc.ingress
    if ing is None:
        return None
    port, dest_port = svc.http_ports[0], len(svc.ports) > 1
    blocks = [[prefix, http_routes(replace(svc, routes=gateway.routes_under(svc, prefix)), port, False, dest_port)]
              for prefix in ing.paths or (None,)]
    tls = {"mode": ing.tls.mode, "credentialName": ing.tls.credential_name} if ing.tls else None
    return {"name": svc.name, "namespace": svc.namespace, "port": ing.port, "hosts": list(ing.hosts),
            "paths": list(ing.paths), "blocks": blocks, "tls": tls, "httpsRedirect": ing.https_redirect}


def _add_ingress_objects(env: m.Environment, objects: dict[str, dict]) -> None:
    """Each ingress host's Gateway server and VirtualService, appended to its owner's file
    (`gateway.plan`): the owner's Gateway `<name>-gateway` serves every host it owns; a
    VirtualService bound to it routes the hosts that share one order of blocks, named
    `<name>-ingress` where only the owner serves them, `<name>-ingress-<first host>` else."""
    ingresses = {key: f["ingress"] for key, f in objects.items() if f.get("ingress")}
    if not ingresses:
        return
    blocks = {(key, prefix): routes for key, ing in ingresses.items() for prefix, routes in ing["blocks"]}
    owned: dict[str, dict[tuple, list[gateway.HostRoutes]]] = {}
    for h in gateway.plan([gateway.Claim(k, tuple(i["hosts"]), i["port"], tuple(i["paths"])) for k, i in ingresses.items()]):
        owned.setdefault(h.owner, {}).setdefault(h.blocks, []).append(h)
    for key, groups in owned.items():
        ing, fragment = ingresses[key], objects[key]
        hosts = [h for group in groups.values() for h in group]
        order = {host: i for i, host in enumerate(ing["hosts"])}
        hosts.sort(key=lambda h: order[h.host])
        docs = [_gateway(ing, [h.host for h in hosts], env)]
        for group in sorted(groups.values(), key=lambda g: order[g[0].host]):
            group.sort(key=lambda h: order[h.host])
            name = f"{ing['name']}-ingress" if group[0].alone else f"{ing['name']}-ingress-{_host_slug(group[0].host)}"
            routes = [route for service, prefix in group[0].blocks for route in blocks[(service, prefix)]]
            docs.append({"apiVersion": NETWORKING, "kind": "VirtualService", "metadata": _meta(name, ing["namespace"]),
                         "spec": {"hosts": [h.host for h in group], "gateways": [f"{ing['name']}-gateway"], "http": routes}})
        objects[key] = {**fragment, "identities": fragment["identities"] + [list(_identity(d)) for d in docs],
                        "added": fragment.get("added", []) + docs}


def _add_sidecars(objects: dict[str, dict]) -> None:
    """For each service with `egress`, appended to its file: a Sidecar, so its pods' proxies
    learn only the hosts it calls (`namespace/host`, `namespace/*` for a whole namespace); and,
    for each service it calls whose TLS names a `credentialName`, that service's
    DestinationRule again with its pods' `workloadSelector`, in its own namespace, since
    Istio's sidecars take the credential only from such a rule (`check` makes sure each such
    service has a caller). Its name, `<caller>.to.<service>.<namespace>`, has dots, which no
    service's name has."""
    fqdn = {key: f["scope"]["fqdn"] for key, f in objects.items()}
    credentialed = [key for key, f in objects.items() if f["scope"].get("credential")]
    for key, fragment in objects.items():
        scope = fragment["scope"]
        if scope["egress"] is None:
            continue
        hosts = sorted({entry if entry.endswith("/*") else f"{entry.split('/')[0]}/{fqdn[entry]}" for entry in scope["egress"]})
        namespace, name = key.split("/")
        docs = [{"apiVersion": NETWORKING, "kind": "Sidecar", "metadata": _meta(name, namespace),
                 "spec": {"workloadSelector": {"labels": dict(scope["selector"])}, "egress": [{"hosts": hosts}]}}]
        for target in credentialed:
            if target != key and m.calls(scope["egress"], target):
                docs.append(_callers_rule(objects[target], key, scope["selector"]))
        objects[key] = {**fragment, "identities": fragment["identities"] + [list(_identity(d)) for d in docs],
                        "added": fragment.get("added", []) + docs}


def _callers_rule(target: dict, caller: str, selector: dict) -> dict:
    """The target's DestinationRule as the caller's pods take it: in the caller's namespace,
    selecting them, seen by nothing else."""
    rule = next(d for d in target["documents"].value if d["kind"] == "DestinationRule")
    namespace, name = caller.split("/")
    target_namespace, target_name = rule["metadata"]["namespace"], rule["metadata"]["name"]
    spec = {"host": rule["spec"]["host"], "workloadSelector": {"matchLabels": dict(selector)}, "exportTo": ["."],
            **{k: v for k, v in rule["spec"].items() if k != "host"}}
    return {"apiVersion": NETWORKING, "kind": "DestinationRule",
            "metadata": _meta(f"{name}.to.{target_name}.{target_namespace}", namespace), "spec": spec}


def _gateway(ing: dict, hosts: list[str], env: m.Environment) -> dict:
    """The owner's Gateway: an HTTP server, or an HTTPS one (with its port-80 redirect server) under `tls`."""
    port = ing["port"]
    if ing["tls"] is None:
        servers = [{"port": {"number": port, "name": f"http-{port}", "protocol": "HTTP"}, "hosts": hosts}]
    else:
        servers = [{"port": {"number": port, "name": f"https-{port}", "protocol": "HTTPS"}, "hosts": hosts,
                    "tls": dict(ing["tls"])}]
        if ing["httpsRedirect"]:
            servers.append({"port": {"number": 80, "name": "http-80", "protocol": "HTTP"}, "hosts": hosts,
                            "tls": {"httpsRedirect": True}})
    return {
        "apiVersion": NETWORKING,
        "kind": "Gateway",
        "metadata": _meta(f"{ing['name']}-gateway", ing["namespace"]),
        "spec": {"selector": dict(env.gateway_selector), "servers": servers},
    }


def _host_slug(host: str) -> str:
    """`*.shop.example.com` → `wildcard-shop-example-com`: a host as part of an object name."""
    return host.lower().replace("*", "wildcard").replace(".", "-")


# -- patches and kustomization -------------------------------------------------------------


def _apply_patch(patch: m.Patch, objects: dict[str, dict], diags: Diagnostics) -> None:
    import jsonpatch  # only environments with patches pay for it

    t = patch.target
    hits = [
        (key, i)
        for key, fragment in objects.items()
        for i, (_, kind, name, namespace) in enumerate(fragment["identities"])
        if kind == t.kind and name == t.name and (t.namespace is None or namespace == t.namespace)
    ]
    where = f"{t.kind} {t.namespace + '/' if t.namespace else ''}{t.name}"
    if not hits:
        diags.error("patch.no-target", f"patch {patch.index + 1}: no generated object is {where}", patch.spans.at(("target",)))
        return
    if len(hits) > 1:
        diags.error("patch.ambiguous-target", f"patch {patch.index + 1}: {where} matches objects in several namespaces; add `namespace`", patch.spans.at(("target",)))
        return
    key, i = hits[0]
    fragment = objects[key]
    docs = list(fragment["documents"].value) + fragment.get("added", [])  # fragments may be shared (cached); patch a copy
    doc, identity = docs[i], fragment["identities"][i]
    for n, op in enumerate(patch.ops):
        try:
            doc = jsonpatch.JsonPatch([op]).apply(doc)  # a copy: the piece's value stays as it was
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            problem = f"failed: {exc}"
        else:
            # The identity names the object's file and its entry in kustomization.yaml (and a later patch's target).
            problem = None if list(_identity(doc) or ()) == identity else "would change its apiVersion, kind, metadata.name or metadata.namespace"
        if problem:
            diags.error("patch.op-failed", f"patch {patch.index + 1}, op {n + 1} ({op['op']} {op['path']}) on {where} {problem}", patch.spans.at(("ops", n)))
            return
    docs[i] = doc
    objects[key] = {**fragment, "documents": Piece.yaml(docs), "added": []}


def _identity(doc) -> tuple | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        return None
    return doc.get("apiVersion"), doc.get("kind"), doc["metadata"].get("name"), doc["metadata"].get("namespace")


def kustomization(paths) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": sorted(paths)}


def _dur(ms: int | None) -> str | None:
    return format_duration(ms) if ms is not None else None


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
