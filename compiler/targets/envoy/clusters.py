"""Clusters: one per (service, port, version) plus the whole service, istiod-style.

A cluster carries the traffic policy of its port and version (`Service.policy_for`:
the DestinationRule's, a port's portLevelSettings, a subset's trafficPolicy):
load balancer (with slow start), connection pool (circuit breakers, connect
timeout, TCP keepalive, HTTP protocol options), outlier detection and upstream
TLS, mapped as istiod's `cluster_traffic_policy.go` maps them.
https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/cluster/v3/cluster.proto
"""

from __future__ import annotations

from compiler.diagnostics import Severity
from compiler.model import (ConnectionPool, H2UpgradePolicy, LoadBalancer, OutlierDetection, Port, Service, SimpleLb,
                            TcpKeepalive, Tls, TlsMode, TrafficPolicy)
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
_LB_CONFIG = {"ROUND_ROBIN": "round_robin_lb_config", "LEAST_REQUEST": "least_request_lb_config"}
_HTTP_OPTIONS_KEY = HTTP_OPTIONS.rsplit("/", 1)[1]  # typed_extension_protocol_options is keyed by the message name


def lower(service: Service, upstreams: tuple[Upstream, ...]) -> tuple[list[dict], list[dict]]:
    """The service's clusters, one per upstream in that order, and what could not be expressed.

    What a cluster takes from its policy is built once per (port, policy) and
    shared by the clusters with that policy: most services have one policy
    for all their versions.
    """
    clusters, shared = [], {}
    for upstream in upstreams:
        port = upstream.port
        policy = service.policy_for(port, upstream.version)
        if (port, policy) not in shared:
            shared[port, policy] = _from_policy(port, policy)
        common, options, socket = shared[port, policy]
        cluster = {"@type": CLUSTER, "name": upstream.name, **_discovery(upstream), **common}
        if options:
            cluster["typed_extension_protocol_options"] = options
        socket = tls.cluster_socket(socket, policy.tls, service.fqdn, port, upstream.version)
        if socket:
            cluster["transport_socket"] = socket
        clusters.append(cluster)
    return clusters, _diagnostics(service)


def _from_policy(port: Port, policy: TrafficPolicy) -> tuple[dict, dict | None, dict | None]:
    """What the clusters of `port` with `policy` share: their common fields, protocol options, TLS socket."""
    pool = policy.connection_pool or ConnectionPool()
    common = {
        "connect_timeout": duration(pool.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS),
        **_load_balancing(policy.load_balancer),
        "circuit_breakers": {"thresholds": [_thresholds(pool)]},
        **_keepalive(pool.tcp_keepalive),
        **_outlier_detection(policy.outlier_detection),
    }
    # HTTP settings mean nothing to a TCP port's clusters (`check` refuses them on a TCP-only service).
    h2 = port.is_http and (tls.is_h2(port) or pool.h2_upgrade_policy is H2UpgradePolicy.UPGRADE)
    options = _http_options(pool, policy.tls, h2) if port.is_http else None
    return common, {_HTTP_OPTIONS_KEY: options} if options else None, tls.shared_socket(policy.tls, h2)


def _discovery(upstream: Upstream) -> dict:
    """EDS over ADS; STRICT_DNS with the assignment inline when a host is a DNS name."""
    if upstream.dns:
        return {"type": "STRICT_DNS", "dns_lookup_family": "V4_ONLY",
                "load_assignment": endpoints.assignment(upstream.name, upstream.addresses)}
    return {"type": "EDS", "eds_cluster_config": {"eds_config": ADS, "service_name": upstream.name}}


def _load_balancing(lb: LoadBalancer | None) -> dict:
    """lb_policy; consistent hashing is RING_HASH (the route says what to hash).

    No policy, and PASSTHROUGH (reported by `_diagnostics`), get istiod's default.
    A warmup is the slow start of ROUND_ROBIN or LEAST_REQUEST (the schema allows
    it with those only), set as istiod's `setWarmup` sets it.
    """
    if lb is not None and lb.consistent_hash is not None:
        return {"lb_policy": "RING_HASH", "ring_hash_lb_config": {"minimum_ring_size": "1024"}}
    policy = _SIMPLE_LB.get(lb.simple if lb is not None else None, "LEAST_REQUEST")
    if lb is None or lb.warmup_ms is None:
        return {"lb_policy": policy}
    return {"lb_policy": policy, _LB_CONFIG[policy]: {"slow_start_config": _slow_start(lb.warmup_ms)}}


def _slow_start(window_ms: int) -> dict:
    """istiod's defaults for what a policy cannot set: a linear ramp (aggression 1.0) from 10% of the weight.

    A RuntimeDouble needs a runtime key; istiod gives "(", which no runtime layer
    sets, so the default value is the one in force.
    """
    return {"slow_start_window": duration(window_ms),
            "aggression": {"default_value": 1.0, "runtime_key": "("},
            "min_weight_percent": {"value": 10.0}}


def _keepalive(keepalive: TcpKeepalive | None) -> dict:
    """`upstream_connection_options.tcp_keepalive`, in whole seconds (as istiod's setKeepAliveSettings).

    An empty one still turns SO_KEEPALIVE on, with the OS's times and count.
    """
    if keepalive is None:
        return {}
    options: dict = {}
    if keepalive.probes:
        options["keepalive_probes"] = keepalive.probes
    if keepalive.time_ms is not None:
        options["keepalive_time"] = keepalive.time_ms // 1000
    if keepalive.interval_ms is not None:
        options["keepalive_interval"] = keepalive.interval_ms // 1000
    return {"upstream_connection_options": {"tcp_keepalive": options}}


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

    `h2` clusters (HTTP2 and GRPC ports, and any HTTP port whose pool says
    `h2UpgradePolicy: UPGRADE`) speak h2 upstream; DEFAULT is the mesh's
    choice, which in Istio's default mesh config is not to upgrade, and no
    policy turns an HTTP2 port back to HTTP/1.1 (istiod's `shouldH2Upgrade`).
    `maxRequestsPerConnection` and `idleTimeout` are
    `common_http_protocol_options.max_requests_per_connection` and `.idle_timeout`;
    SIMPLE/MUTUAL without an explicit SNI get istiod's auto_sni (and
    auto_san_validation without explicit SANs).
    """
    options, common = {}, {}
    if pool.max_requests_per_connection:
        common["max_requests_per_connection"] = pool.max_requests_per_connection
    if pool.idle_timeout_ms is not None:
        common["idle_timeout"] = duration(pool.idle_timeout_ms)
    if common:
        options["common_http_protocol_options"] = common
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
    problems = []
    policies = [("the service", (), service.policy), *_own_policies(service)]
    for what, path, policy in policies:
        if policy.load_balancer is not None and policy.load_balancer.simple is SimpleLb.PASSTHROUGH:
            # istiod makes an ORIGINAL_DST cluster, which forwards to the address the
            # client dialled. These listeners bind that address themselves (there is
            # no iptables redirect in front of them), so ORIGINAL_DST would loop back
            # into the proxy: the Envoy target balances with istiod's default instead.
            problems.append(problem(
                "envoy.passthrough-unsupported",
                f"{service.key}: loadBalancer PASSTHROUGH cannot be expressed by the Envoy target "
                "(its listeners bind the service ports, so there is no original destination to "
                f"pass through to); the Envoy clusters of {what} use LEAST_REQUEST",
                span_of(service, *path, "loadBalancer"), Severity.WARNING))
    service_hash = _hash(service.load_balancer)
    for what, path, policy in policies[1:]:
        inherits = path[0] == "versions" and policy.load_balancer is None
        if not inherits and _hash(policy.load_balancer) != service_hash:
            # istiod takes a route's hash policy (and whether its retries avoid hosts already
            # tried) from the destination's merged policy; these routes take the service's.
            where = (*path, "loadBalancer") if policy.load_balancer is not None else path
            problems.append(problem(
                "envoy.hash-by-service",
                f"{service.key}: {what} hashes requests otherwise than the service does, but the Envoy "
                "target builds its routes' hash policy from the service's loadBalancer only: the routes "
                f"to {what} carry the service's hash policy, not the one of its own policy",
                span_of(service, *where), Severity.WARNING))
    return problems


def _own_policies(service: Service) -> list[tuple[str, tuple, TrafficPolicy]]:
    """(what, where in the spec, policy) of each version's and port's own policy, in spec order."""
    return ([(f"version {v.name}", ("versions", v.name, "policy"), v.policy) for v in service.versions if v.policy]
            + [(f"port {p.number}", ("ports", i, "policy"), p.policy) for i, p in enumerate(service.ports) if p.policy])


def _hash(lb: LoadBalancer | None):
    return lb.consistent_hash if lb is not None else None
