"""Model building: validated, effective specs → frozen model values.

Inputs here have passed the schema, so types are right; what this stage
decides is shape (which traffic form a policy uses) and defaults. Anything
the model cannot represent is a diagnostic at the span that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler import model as m
from compiler.diagnostics import Diagnostics, Note, SpanMap
from compiler.values import duration_ms, split_address


def service(meta: dict, spec: dict, spans: SpanMap, env: m.Environment, endpoints: m.Endpoints, diags: Diagnostics) -> m.Service:
    name, namespace = meta["name"], meta["namespace"]
    external = spec.get("external")
    fqdn = external["hosts"][0] if external else f"{name}.{namespace}.svc.{env.cluster_domain}"
    own = _HttpPolicy.of(spec, f"{namespace}/{name}", fqdn, env)
    traffic = _traffic(spec.get("traffic"), spans, diags)
    return m.Service(
        name=name,
        namespace=namespace,
        fqdn=fqdn,
        selector=tuple(sorted((spec.get("selector") or {}).items())),
        ports=tuple(_port(p) for p in spec["ports"]),
        versions=tuple(m.Version(v, tuple(sorted(d["labels"].items())), _policy(d.get("policy")))
                       for v, d in sorted(spec.get("versions", {}).items())),
        traffic=traffic,
        timeout_ms=own.timeout_ms,
        retries=own.retries,
        load_balancer=_load_balancer(spec.get("loadBalancer")),
        connection_pool=_connection_pool(spec.get("connectionPool")),
        outlier_detection=_outlier_detection(spec.get("outlierDetection")),
        tls=_tls(spec.get("tls")),
        ingress=_ingress(spec.get("ingress")),
        endpoints=endpoints,
        headers=own.headers,
        cors=own.cors,
        fault=own.fault,
        mirror=own.mirror,
        routes=_routes(spec, traffic, own, f"{namespace}/{name}", fqdn, env, spans, diags),
        external=m.External(fqdn, external.get("resolution", "DNS")) if external else None,
        egress=tuple(spec["egress"]) if spec.get("egress") is not None else None,
        spans=spans,
    )


def _ms(value: str | None) -> int | None:
    return duration_ms(value) if value is not None else None


def _port(p: dict) -> m.Port:
    return m.Port(p["name"], p["port"], p.get("targetPort", p["port"]), m.Protocol(p.get("protocol", "HTTP")), _policy(p.get("policy")))


def _policy(p: dict | None) -> m.TrafficPolicy | None:
    """A version's or a port's `policy`; `{}` is a policy too (on a port: every field at its default)."""
    if p is None:
        return None
    return m.TrafficPolicy(_load_balancer(p.get("loadBalancer")), _connection_pool(p.get("connectionPool")),
                           _outlier_detection(p.get("outlierDetection")), _tls(p.get("tls")))


def _traffic(t: dict | None, spans: SpanMap, diags: Diagnostics, at: tuple = ("traffic",)) -> m.Traffic:
    if not t:
        return m.Traffic()
    if "split" in t:
        for other in ("stable", "canary"):
            if other in t:
                # At the split: when an override switches a policy to a split, that is the line to fix.
                split_at, other_at = spans.key_at(at + ("split",)), spans.key_at(at + (other,))
                hint = f" (an override removes it with `{other}: null`)" if split_at and other_at and split_at.path != other_at.path else ""
                diags.error(
                    "traffic.shape",
                    f"traffic takes either `split` or `stable` (with an optional `canary`), not both; remove `{other}`{hint}",
                    split_at,
                    Note(f"`{other}` is set here", other_at),
                )
        weights = tuple(m.WeightedVersion(v, w) for v, w in sorted(t["split"].items()))
        return m.Traffic(m.TrafficShape.SPLIT, weights)
    if "stable" not in t:
        diags.error("traffic.shape", "a canary needs a `stable` version to take the rest of the traffic", spans.key_at(at + ("canary",)))
        return m.Traffic()
    canary = t.get("canary")
    if canary is None:
        return m.Traffic(m.TrafficShape.STABLE, (m.WeightedVersion(t["stable"], 100),))
    weight = canary["weight"]
    weights = (m.WeightedVersion(t["stable"], 100 - weight), m.WeightedVersion(canary["version"], weight))
    headers = (canary.get("match") or {}).get("headers", {})
    match = _header_matches(headers)
    return m.Traffic(m.TrafficShape.CANARY, weights, match, canary["version"] if match else None, _plan(canary))


def _plan(canary: dict) -> m.CanaryPlan | None:
    if "steps" not in canary and "analysis" not in canary and "halted" not in canary:
        return None
    analysis = canary.get("analysis") or {}
    return m.CanaryPlan(
        steps=tuple(canary.get("steps") or ()),
        success_min=(analysis.get("successRate") or {}).get("min"),
        latency_p99_max_ms=_ms((analysis.get("latencyP99") or {}).get("max")),
        interval_ms=_ms(analysis.get("interval")),
        min_requests=analysis.get("minRequests", 0),
        halted=canary.get("halted"),
    )


def _header_matches(headers: dict) -> tuple[m.HeaderMatch, ...]:
    """Sorted by header name, as istiod sorts them."""
    return tuple(_header_match(h, rule) for h, rule in sorted(headers.items()))


def _header_match(name: str, rule: dict) -> m.HeaderMatch:
    kind, value = next(iter(rule.items()))
    return m.HeaderMatch(name, m.MatchKind(kind), "" if kind == "present" else value)


# -- routes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpPolicy:
    """What a service sets for every HTTP route, and a route may set for itself instead."""

    timeout_ms: int | None = None
    retries: m.Retries | None = None
    headers: m.Headers | None = None
    cors: m.Cors | None = None
    fault: m.Fault | None = None
    mirror: m.Mirror | None = None

    @classmethod
    def of(cls, spec: dict, own_key: str, own_fqdn: str, env: m.Environment, under: "_HttpPolicy | None" = None) -> "_HttpPolicy":
        base = under or cls()
        return cls(
            timeout_ms=_ms(spec["timeout"]) if "timeout" in spec else base.timeout_ms,
            retries=_retries(spec["retries"]) if "retries" in spec else base.retries,
            headers=_headers(spec["headers"]) if "headers" in spec else base.headers,
            cors=_cors(spec["cors"]) if "cors" in spec else base.cors,
            fault=_fault(spec["fault"]) if "fault" in spec else base.fault,
            mirror=_mirror(spec["mirror"], own_key, own_fqdn, env) if "mirror" in spec else base.mirror,
        )

    def fields(self) -> dict:
        return {"timeout_ms": self.timeout_ms, "retries": self.retries, "headers": self.headers, "cors": self.cors,
                "fault": self.fault, "mirror": self.mirror}


def _routes(spec: dict, traffic: m.Traffic, own: _HttpPolicy, key: str, fqdn: str, env: m.Environment,
            spans: SpanMap, diags: Diagnostics) -> tuple[m.Route, ...]:
    """Every HTTP route in the order they are tried: each named route (its canary's header
    route first), then the service's own (`canary-match`, `default`). Like istiod, nothing
    after a route that matches every request: it could never be reached."""
    routes: list[m.Route] = []
    for name, r in (spec.get("routes") or {}).items():
        at = ("routes", name)
        policy = _HttpPolicy.of(r, key, fqdn, env, own)
        match = _route_match(r.get("match") or {})
        common = {"rewrite": _rewrite(r.get("rewrite")), "source": at, **policy.fields()}
        if "redirect" in r:
            routes.append(m.Route(name, match, redirect=_redirect(r["redirect"]), **common))
        elif "directResponse" in r:
            d = r["directResponse"]
            routes.append(m.Route(name, match, direct_response=m.DirectResponse(d["status"], d.get("body")), **common))
        else:
            t = _traffic(r["traffic"], spans, diags, at + ("traffic",)) if "traffic" in r else traffic
            routes += _traffic_routes(name, match, t, common)
    if not any(r.match.is_everything for r in routes):  # else `check` reports what comes after it
        routes += _traffic_routes("", m.RouteMatch(), traffic, {"source": (), **own.fields()})
    return tuple(routes)


def default_routes(svc: m.Service) -> tuple[m.Route, ...]:
    """The routes of a service that names none: its traffic, with its own values."""
    own = {"timeout_ms": svc.timeout_ms, "retries": svc.retries, "headers": svc.headers, "cors": svc.cors,
           "fault": svc.fault, "mirror": svc.mirror}
    return tuple(_traffic_routes("", m.RouteMatch(), svc.traffic, {"source": (), **own}))


def _traffic_routes(name: str, match: m.RouteMatch, t: m.Traffic, common: dict) -> list[m.Route]:
    """A route sending `t`: a canary with a header match first takes the matching requests."""
    routes = []
    if t.match and t.match_version:
        pinned = m.Traffic(m.TrafficShape.STABLE, (m.WeightedVersion(t.match_version, 100),))
        headers = tuple(sorted(match.headers + t.match, key=lambda h: h.header))
        routes.append(m.Route(f"{name}-canary-match" if name else "canary-match", replace(match, headers=headers),
                              traffic=pinned, **common))
    routes.append(m.Route(name or "default", match, traffic=t, **common))
    return routes


def _route_match(match: dict) -> m.RouteMatch:
    path = match.get("path")
    kind, value = next(iter(path.items())) if path else (None, None)
    methods = match.get("methods") or ()
    return m.RouteMatch(
        path=m.StringMatch(m.MatchKind(kind), value) if path else None,
        methods=tuple(dict.fromkeys(methods)),
        headers=_header_matches(match.get("headers") or {}),
        query=tuple(m.QueryMatch(q, m.MatchKind(next(iter(rule))), next(iter(rule.values())))
                    for q, rule in sorted((match.get("query") or {}).items())),
    )


def _rewrite(r: dict | None) -> m.Rewrite | None:
    if r is None:
        return None
    regex = r.get("regex") or {}
    return m.Rewrite(r.get("prefix"), regex.get("match"), regex.get("substitute"), r.get("authority"))


def _redirect(r: dict) -> m.Redirect:
    return m.Redirect(r.get("path"), r.get("scheme"), r.get("host"), r.get("port"), r.get("code", m.Redirect.code))


def _fault(f: dict) -> m.Fault:
    delay, abort = f.get("delay") or {}, f.get("abort") or {}
    return m.Fault(
        delay_ms=_ms(delay.get("fixed")),
        delay_percent=delay.get("percent", 100),
        abort_status=abort.get("status"),
        abort_grpc_status=abort.get("grpcStatus"),
        abort_percent=abort.get("percent", 100),
    )


def _mirror(mirror: dict, own_key: str, own_fqdn: str, env: m.Environment) -> m.Mirror:
    key = mirror.get("service", own_key)
    namespace, _, name = key.partition("/")
    fqdn = own_fqdn if key == own_key else f"{name}.{namespace}.svc.{env.cluster_domain}"
    return m.Mirror(key, fqdn, mirror.get("version"), mirror.get("percent", 100))


def _header_ops(ops: dict | None) -> m.HeaderOps:
    ops = ops or {}
    return m.HeaderOps(tuple(sorted((ops.get("set") or {}).items())), tuple(sorted((ops.get("add") or {}).items())),
                       tuple(dict.fromkeys(ops.get("remove") or ())))


def _headers(h: dict) -> m.Headers:
    return m.Headers(_header_ops(h.get("request")), _header_ops(h.get("response")))


def _cors(c: dict) -> m.Cors:
    return m.Cors(
        allow_origins=tuple(m.StringMatch(m.MatchKind(k), v) for o in c.get("allowOrigins") or () for k, v in o.items()),
        allow_methods=tuple(c.get("allowMethods") or ()),
        allow_headers=tuple(c.get("allowHeaders") or ()),
        expose_headers=tuple(c.get("exposeHeaders") or ()),
        max_age_ms=_ms(c.get("maxAge")),
        allow_credentials=c.get("allowCredentials"),
    )


def _retries(r: dict | None) -> m.Retries | None:
    if r is None:
        return None
    return m.Retries(r["attempts"], _ms(r.get("perTryTimeout")), tuple(r.get("retryOn", ())))


def _load_balancer(lb) -> m.LoadBalancer | None:
    if lb is None:
        return None
    if isinstance(lb, str):
        return m.LoadBalancer(simple=m.SimpleLb(lb))
    simple = m.SimpleLb(lb["simple"]) if "simple" in lb else None
    return m.LoadBalancer(simple, _consistent_hash(lb.get("consistentHash")), _ms(lb.get("warmup")))


def _consistent_hash(ch: dict | None) -> m.ConsistentHash | None:
    if ch is None:
        return None
    kind, arg = next(iter(ch.items()))
    on = m.HashOn(kind)
    if on is m.HashOn.HEADER:
        return m.ConsistentHash(on, header=arg)
    if on is m.HashOn.COOKIE:
        return m.ConsistentHash(on, cookie=arg["name"], cookie_ttl_ms=_ms(arg.get("ttl")), cookie_path=arg.get("path"))
    return m.ConsistentHash(on)


def _connection_pool(cp: dict | None) -> m.ConnectionPool | None:
    if cp is None:
        return None
    tcp, http = cp.get("tcp") or {}, cp.get("http") or {}
    return m.ConnectionPool(
        max_connections=tcp.get("maxConnections"),
        connect_timeout_ms=_ms(tcp.get("connectTimeout")),
        http1_max_pending_requests=http.get("http1MaxPendingRequests"),
        http2_max_requests=http.get("http2MaxRequests"),
        max_requests_per_connection=http.get("maxRequestsPerConnection"),
        max_retries=http.get("maxRetries"),
        tcp_keepalive=_tcp_keepalive(tcp.get("tcpKeepalive")),
        idle_timeout_ms=_ms(http.get("idleTimeout")),
        h2_upgrade_policy=m.H2UpgradePolicy(http["h2UpgradePolicy"]) if "h2UpgradePolicy" in http else None,
    )


def _tcp_keepalive(k: dict | None) -> m.TcpKeepalive | None:
    if k is None:
        return None
    return m.TcpKeepalive(_ms(k.get("time")), _ms(k.get("interval")), k.get("probes"))


def _outlier_detection(od: dict | None) -> m.OutlierDetection | None:
    if od is None:
        return None
    return m.OutlierDetection(
        consecutive_5xx_errors=od.get("consecutive5xxErrors"),
        interval_ms=_ms(od.get("interval")),
        base_ejection_time_ms=_ms(od.get("baseEjectionTime")),
        max_ejection_percent=od.get("maxEjectionPercent"),
    )


def _tls(tls: dict | None) -> m.Tls | None:
    if tls is None:
        return None
    return m.Tls(m.TlsMode(tls["mode"]), tls.get("credentialName"), tls.get("sni"), tuple(tls.get("subjectAltNames", ())))


def _ingress(ing: dict | None) -> m.Ingress | None:
    if ing is None:
        return None
    tls = ing.get("tls")
    return m.Ingress(tuple(ing["hosts"]), ing.get("port", 443 if tls else 80), tuple(ing.get("paths") or ()),
                     m.IngressTls(tls["mode"], tls["credentialName"]) if tls else None, bool(ing.get("httpsRedirect")))


def endpoints(raw) -> m.Endpoints:
    """An environment's `endpoints` entry (a list, or version → list) → `Endpoints`."""
    if raw is None:
        return m.Endpoints()
    if isinstance(raw, list):
        return m.Endpoints(unversioned=tuple(_address(a) for a in raw))
    return m.Endpoints(by_version=tuple((v, tuple(_address(a) for a in addrs)) for v, addrs in sorted(raw.items())))


def _address(addr: str) -> m.Address:
    host, port = split_address(addr)
    return m.Address(host, port)


def environment(name: str, spec: dict, spans: SpanMap) -> m.Environment:
    patches = tuple(
        m.Patch(
            index=i,
            target=m.PatchTarget(p["target"]["kind"], p["target"].get("namespace"), p["target"]["name"]),
            ops=tuple(p["ops"]),
            spans=spans.under(("patches", i)),
        )
        for i, p in enumerate(spec.get("patches", ()))
    )
    gateway = spec.get("gateway", {}).get("selector")
    return m.Environment(
        name=name,
        cluster_domain=spec.get("clusterDomain", m.Environment.cluster_domain),
        gateway_selector=tuple(sorted(gateway.items())) if gateway else m.Environment.gateway_selector,
        patches=patches,
        envoy=m.EnvoyOptions(spec.get("envoy", {}).get("listenerAddress", m.EnvoyOptions.listener_address)),
        spans=spans,
    )
