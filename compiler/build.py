"""Model building: validated, effective specs → frozen model values.

Inputs here have passed the schema, so types are right; what this stage
decides is shape (which traffic form a policy uses) and defaults. Anything
the model cannot represent is a diagnostic at the span that caused it.
"""

from __future__ import annotations

from compiler import model as m
from compiler.diagnostics import Diagnostics, Note, SpanMap
from compiler.values import duration_ms, split_address


def service(meta: dict, spec: dict, spans: SpanMap, env: m.Environment, endpoints: m.Endpoints, diags: Diagnostics) -> m.Service:
    name, namespace = meta["name"], meta["namespace"]
    return m.Service(
        name=name,
        namespace=namespace,
        fqdn=f"{name}.{namespace}.svc.{env.cluster_domain}",
        selector=tuple(sorted(spec["selector"].items())),
        ports=tuple(_port(p) for p in spec["ports"]),
        versions=tuple(m.Version(v, tuple(sorted(d["labels"].items())), _policy(d.get("policy")))
                       for v, d in sorted(spec.get("versions", {}).items())),
        traffic=_traffic(spec.get("traffic"), spans, diags),
        timeout_ms=_ms(spec.get("timeout")),
        retries=_retries(spec.get("retries")),
        load_balancer=_load_balancer(spec.get("loadBalancer")),
        connection_pool=_connection_pool(spec.get("connectionPool")),
        outlier_detection=_outlier_detection(spec.get("outlierDetection")),
        tls=_tls(spec.get("tls")),
        ingress=_ingress(spec.get("ingress")),
        endpoints=endpoints,
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


def _traffic(t: dict | None, spans: SpanMap, diags: Diagnostics) -> m.Traffic:
    if not t:
        return m.Traffic()
    if "split" in t:
        for other in ("stable", "canary"):
            if other in t:
                # At the split: when an override switches a policy to a split, that is the line to fix.
                split_at, other_at = spans.key_at(("traffic", "split")), spans.key_at(("traffic", other))
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
        diags.error("traffic.shape", "a canary needs a `stable` version to take the rest of the traffic", spans.key_at(("traffic", "canary")))
        return m.Traffic()
    canary = t.get("canary")
    if canary is None:
        return m.Traffic(m.TrafficShape.STABLE, (m.WeightedVersion(t["stable"], 100),))
    weight = canary["weight"]
    weights = (m.WeightedVersion(t["stable"], 100 - weight), m.WeightedVersion(canary["version"], weight))
    headers = (canary.get("match") or {}).get("headers", {})
    match = tuple(m.HeaderMatch(h, m.MatchKind(next(iter(rule))), next(iter(rule.values()))) for h, rule in sorted(headers.items()))
    return m.Traffic(m.TrafficShape.CANARY, weights, match, canary["version"] if match else None)


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
    return m.Ingress(tuple(ing["hosts"]), ing.get("port", 80))


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
