"""The two targets mean the same thing, cluster by cluster.

For every rendered tree `test_targets_agree` compares route by route, each Envoy
cluster `outbound|PORT|SUBSET|FQDN` is held to what istiod would build from the
Istio output: the DestinationRule's policy for that port and subset, merged as
istiod merges it, then translated as istiod translates it. Both are written here
once, from istiod's source, so the test holds both targets to Istio rather than
to each other:
https://github.com/istio/istio/blob/master/pilot/pkg/networking/util/util.go
(`GetPortLevelTrafficPolicy`, `MergeSubsetTrafficPolicy`) and
https://github.com/istio/istio/blob/master/pilot/pkg/networking/core/cluster_traffic_policy.go
(`applyConnectionPool`, `applyTCPKeepalive`, `shouldH2Upgrade`, `applyLoadBalancer`,
`setWarmup`, `applyOutlierDetection`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_targets_agree import TREES, _seconds

UNLIMITED = 4294967295
FIELDS = ("connectionPool", "loadBalancer", "outlierDetection", "tls")


def _port_level(policy: dict | None, port: int) -> dict | None:
    """GetPortLevelTrafficPolicy: a port's entry replaces the whole policy, its omissions at their defaults."""
    for entry in (policy or {}).get("portLevelSettings", ()):
        if entry["port"]["number"] == port:
            return {k: v for k, v in entry.items() if k in FIELDS}
    return policy


def _merged(rule: dict | None, subset: str, port: int) -> dict:
    """MergeSubsetTrafficPolicy: the DestinationRule's policy for the port, then the subset's fields, each whole."""
    spec = (rule or {}).get("spec", {})
    merged = dict(_port_level(spec.get("trafficPolicy"), port) or {})
    own = next((s.get("trafficPolicy") for s in spec.get("subsets", ()) if s["name"] == subset), None)
    if own:
        merged.update({k: v for k, v in own.items() if k in FIELDS})
    return merged


def _istio_meaning(policy: dict, protocol: str) -> dict:
    """What istiod's cluster from `policy` does, in the terms `_envoy_meaning` reads back."""
    pool, lb = policy.get("connectionPool") or {}, policy.get("loadBalancer") or {}
    tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
    simple = lb.get("simple", "LEAST_REQUEST")
    balancer = "RING_HASH" if "consistentHash" in lb else simple
    keepalive = tcp.get("tcpKeepalive")
    meaning = {
        "lb_policy": balancer,
        "warmup": _seconds(lb["warmup"]["duration"]) if "warmup" in lb and balancer in ("ROUND_ROBIN", "LEAST_REQUEST") else None,
        "connect_timeout": _seconds(tcp.get("connectTimeout", "10s")),
        "thresholds": (tcp.get("maxConnections") or UNLIMITED, http.get("http1MaxPendingRequests") or UNLIMITED,
                       http.get("http2MaxRequests") or UNLIMITED, http.get("maxRetries") or UNLIMITED),
        "keepalive": None if keepalive is None else {
            k: int(_seconds(keepalive[k])) if k != "probes" else keepalive[k] for k in keepalive},
        "outlier_5xx": (policy.get("outlierDetection") or {}).get("consecutive5xxErrors"),
        "tls": (policy.get("tls") or {}).get("mode", "DISABLE") != "DISABLE",
    }
    if protocol != "tcp":  # HTTP protocol options mean nothing to a TCP proxy's cluster
        meaning.update({
            "h2": protocol in ("http2", "grpc") or http.get("h2UpgradePolicy") == "UPGRADE",
            "idle_timeout": _seconds(http.get("idleTimeout")),
            "max_requests_per_connection": http.get("maxRequestsPerConnection") or None,
        })
    return meaning


def _envoy_meaning(cluster: dict, protocol: str) -> dict:
    slow_start = next((cluster[k]["slow_start_config"] for k in ("round_robin_lb_config", "least_request_lb_config")
                       if k in cluster), None)
    keepalive = cluster.get("upstream_connection_options", {}).get("tcp_keepalive")
    thresholds = cluster["circuit_breakers"]["thresholds"][0]
    options = cluster.get("typed_extension_protocol_options", {}).get(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {})
    common = options.get("common_http_protocol_options", {})
    meaning = {
        "lb_policy": cluster["lb_policy"],
        "warmup": _seconds(slow_start["slow_start_window"]) if slow_start else None,
        "connect_timeout": _seconds(cluster["connect_timeout"]),
        "thresholds": (thresholds["max_connections"], thresholds["max_pending_requests"],
                       thresholds["max_requests"], thresholds["max_retries"]),
        "keepalive": None if keepalive is None else {
            k.removeprefix("keepalive_"): v for k, v in keepalive.items()},
        "outlier_5xx": cluster.get("outlier_detection", {}).get("consecutive_5xx"),
        "tls": "transport_socket" in cluster,
    }
    if protocol != "tcp":
        meaning.update({
            "h2": "http2_protocol_options" in options.get("explicit_http_config", {}),
            "idle_timeout": _seconds(common.get("idle_timeout")),
            "max_requests_per_connection": common.get("max_requests_per_connection"),
        })
    return meaning


def _services(tree: Path):
    """(Service, DestinationRule) of every service of a tree's Istio output that has a DestinationRule."""
    for path in sorted((tree / "istio").rglob("*.yaml")):
        docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}
        for (kind, name), service in docs.items():
            if kind == "Service" and ("DestinationRule", name) in docs:
                yield service, docs["DestinationRule", name]


def _pairs(tree: Path):
    """(cluster name, Istio meaning, Envoy meaning) of every cluster of a service with a DestinationRule."""
    clusters = {c["name"]: c for c in json.loads((tree / "envoy" / "clusters.json").read_text())["resources"]}
    for service, rule in _services(tree):
        subsets = [""] + [s["name"] for s in rule["spec"].get("subsets", ())]
        for port in service["spec"]["ports"]:
            for subset in subsets:
                name = f"outbound|{port['port']}|{subset}|{rule['spec']['host']}"
                policy = _merged(rule, subset, port["port"])
                if (policy.get("loadBalancer") or {}).get("simple") == "PASSTHROUGH":
                    continue  # the Envoy target says it cannot pass through, and balances instead
                yield name, _istio_meaning(policy, port["appProtocol"]), _envoy_meaning(clusters[name], port["appProtocol"])


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_cluster_means_what_istiod_would_build(tree):
    for name, istio, envoy in _pairs(TREES[tree]):
        assert envoy == istio, name


def test_the_comparison_covers_every_new_policy_field():
    """The trees hold what matters: port and subset policies, keepalive, idle timeout, upgrade, warmup."""
    meanings = [istio for tree in TREES.values() for _, istio, _ in _pairs(tree)]
    assert any(m["keepalive"] == {} for m in meanings) and any(m["keepalive"] and "probes" in m["keepalive"] for m in meanings)
    assert any(m.get("idle_timeout") for m in meanings)
    assert any(m.get("h2") for m in meanings if m.get("idle_timeout"))  # an upgraded HTTP/1.1 port
    assert {m["lb_policy"] for m in meanings if m["warmup"]} == {"ROUND_ROBIN", "LEAST_REQUEST"}
    names = {name for tree in TREES.values() for name, _, _ in _pairs(tree)}
    assert "outbound|9090|v2|cart.shop.svc.cluster.local" in names  # a port's policy under a version's


def test_a_port_policy_is_not_merged_field_by_field():
    """A negative control for the reading above: the port's entry replaces the service's policy whole."""
    rule = {"spec": {"trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"},
                                       "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}]},
                     "subsets": [{"name": "v1", "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 1}}}]}}
    assert _merged(rule, "v1", 80) == {"loadBalancer": {"simple": "RANDOM"}, "outlierDetection": {"consecutive5xxErrors": 1}}
    assert _merged(rule, "", 81) == {"tls": {"mode": "ISTIO_MUTUAL"}, "portLevelSettings": rule["spec"]["trafficPolicy"]["portLevelSettings"]}
