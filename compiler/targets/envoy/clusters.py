"""Clusters: one per (service, port, version) plus the whole service, istiod-style.

A cluster carries the DestinationRule's traffic policy: load balancer,
connection pool (circuit breakers, connect timeout, HTTP protocol options),
outlier detection and upstream TLS, mapped as istiod's
`cluster_traffic_policy.go` maps them.
https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/cluster/v3/cluster.proto
"""

from __future__ import annotations

from compiler.diagnostics import Severity
from compiler.model import ConnectionPool, LoadBalancer, OutlierDetection, Service, SimpleLb, Tls, TlsMode
from compiler.targets.envoy import endpoints, tls
from compiler.targets.envoy.common import ADS, HTTP_OPTIONS, duration, problem, span_of
from compiler.targets.envoy.endpoints import Upstream
from compiler.xds.resources import CLUSTER

#: istiod's mesh-wide default `connectTimeout`.
DEFAULT_CONNECT_TIMEOUT_MS = 10_000
#: istiod sets every threshold to the maximum (Envoy's defaults, e.g. 3
#: concurrent retries, trip during rolling updates) unless the policy says otherwise.
UNLIMITED = 4294967295
_SIMPLE_LB = {SimpleLb.ROUND_ROBIN: "ROUND_ROBIN", SimpleLb.LEAST_REQUEST: "LEAST_REQUEST",
              SimpleLb.RANDOM: "RANDOM"}
_HTTP_OPTIONS_KEY = HTTP_OPTIONS.rsplit("/", 1)[1]  # typed_extension_protocol_options is keyed by the message name


def lower(service: Service, upstreams: tuple[Upstream, ...]) -> tuple[list[dict], list[dict]]:
    """The service's clusters, one per upstream in that order, and what could not be expressed.

    What does not depend on the port or version (timeouts, load balancing,
    circuit breakers, outlier detection) is built once per service and shared
    by its clusters; HTTP options and TLS once per port.
    """
    pool = service.connection_pool or ConnectionPool()
    common = {
        "connect_timeout": duration(pool.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS),
        **_load_balancing(service.load_balancer),
        "circuit_breakers": {"thresholds": [_thresholds(pool)]},
        **_outlier_detection(service.outlier_detection),
    }
    clusters, per_port = [], {}
    for upstream in upstreams:
        port = upstream.port
        if port not in per_port:
            h2 = tls.is_h2(port)
            options = _http_options(pool, service.tls, h2) if port.is_http else None
            per_port[port] = {_HTTP_OPTIONS_KEY: options} if options else None, tls.port_socket(service, port, h2)
        options, port_socket = per_port[port]
        cluster = {"@type": CLUSTER, "name": upstream.name, **_discovery(upstream), **common}
        if options:
            cluster["typed_extension_protocol_options"] = options
        socket = tls.cluster_socket(port_socket, service, port, upstream.version)
        if socket:
            cluster["transport_socket"] = socket
        clusters.append(cluster)
    return clusters, _diagnostics(service)


def _discovery(upstream: Upstream) -> dict:
    """EDS over ADS; STRICT_DNS with the assignment inline when a host is a DNS name."""
    if upstream.dns:
        return {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
                "load_assignment": endpoints.assignment(upstream.name, upstream.addresses)}
    return {"type": "EDS", "eds_cluster_config": {"eds_config": ADS, "service_name": upstream.name}}


def _load_balancing(lb: LoadBalancer | None) -> dict:
    """lb_policy; consistent hashing is RING_HASH (the route says what to hash).

    No policy, and PASSTHROUGH (reported by `_diagnostics`), get istiod's default.
    """
    if lb is not None and lb.consistent_hash is not None:
        return {"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": "1024"}}
    simple = lb.simple if lb is not None else None
    return {"lb_policy": _SIMPLE_LB.get(simple, "LEAST_REQUEST")}


def _thresholds(pool: ConnectionPool) -> dict:
    """Circuit-breaker thresholds, as istiod's applyConnectionPool (zero means unset there too)."""
    return {
        "max_connections": pool.max_connections or UNLIMITED,
        "max_pending_requests": pool.http1_max_pending_requests or UNLIMITED,
        "max_requests": pool.http2_max_requests or UNLIMITED,
        "max_retries": pool.max_retries or UNLIMITED,
        "track_remaining": True,
    }


def _outlier_detection(outlier: OutlierDetection | None) -> dict:
    """Consecutive-5xx ejection only; success-rate ejection off and the panic threshold at 0, as istiod."""
    if outlier is None:
        return {}
    out: dict = {"enforcing_success_rate": 0}
    if outlier.consecutive_5xx_errors is not None:
        out["consecutive_5xx"] = outlier.consecutive_5xx_errors
        out["enforcing_consecutive_5xx"] = 100 if outlier.consecutive_5xx_errors > 0 else 0
    if outlier.interval_ms is not None:
        out["interval"] = duration(outlier.interval_ms)
    if outlier.base_ejection_time_ms is not None:
        out["base_ejection_time"] = duration(outlier.base_ejection_time_ms)
    if outlier.max_ejection_percent is not None:
        out["max_ejection_percent"] = outlier.max_ejection_percent
    return {"outlier_detection": out, "common_lb_config": {"healthy_panic_threshold": {"value": 0}}}


def _http_options(pool: ConnectionPool, policy_tls: Tls | None, h2: bool) -> dict | None:
    """envoy.extensions.upstreams.http.v3.HttpProtocolOptions, when anything differs from HTTP/1.1 defaults.

    HTTP2 and GRPC ports speak h2 upstream; `maxRequestsPerConnection` is
    `common_http_protocol_options.max_requests_per_connection`; SIMPLE/MUTUAL
    without an explicit SNI get istiod's auto_sni (and auto_san_validation
    without explicit SANs).
    """
    options: dict = {}
    if pool.max_requests_per_connection:
        options["common_http_protocol_options"] = {
            "max_requests_per_connection": pool.max_requests_per_connection}
    if policy_tls and policy_tls.mode in (TlsMode.SIMPLE, TlsMode.MUTUAL) and not policy_tls.sni:
        upstream = {"auto_sni": True}
        if not policy_tls.subject_alt_names:
            upstream["auto_san_validation"] = True
        options["upstream_http_protocol_options"] = upstream
    if not options and not h2:
        return None
    protocol = {"http2_protocol_options": {}} if h2 else {"http_protocol_options": {}}
    return {"@type": HTTP_OPTIONS, "explicit_http_config": protocol, **options}


def _diagnostics(service: Service) -> list[dict]:
    problems = tls.diagnostics(service)
    lb = service.load_balancer
    if lb is not None and lb.simple is SimpleLb.PASSTHROUGH:
        # istiod makes an ORIGINAL_DST cluster, which forwards to the address the
        # client dialled. These listeners bind that address themselves (there is
        # no iptables redirect in front of them), so ORIGINAL_DST would loop back
        # into the proxy: the Envoy target balances with istiod's default instead.
        problems.append(problem(
            "envoy.passthrough-unsupported",
            f"{service.key}: loadBalancer PASSTHROUGH cannot be expressed by the Envoy target "
            "(its listeners bind the service ports, so there is no original destination to "
            "pass through to); its Envoy clusters use LEAST_REQUEST",
            span_of(service, "loadBalancer"), Severity.WARNING))
    return problems
