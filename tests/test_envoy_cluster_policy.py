"""A real Envoy (1.40) applies each cluster's own traffic policy: the service's, a port's, a version's.

The golden case `version-and-port-policy` is compiled with meshc (its CLI, into a
temporary directory) with its prod environment rewritten for the test: listeners
on a loopback address of the test's own and, for the behaviour test, endpoints on
real HTTP backends. The snapshot is loaded from files (`envoy_static`), which
needs no secrets server for the ISTIO_MUTUAL clusters. What Envoy reports in
/config_dump and /stats is what it took from the files, so a field it dropped or
refused fails here.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from conftest import GOLDEN
from envoy_static import file_bootstrap
from golden import run_cli
from support.backends import Backend, unique_loopback
from support.envoy import Envoy, count_responses

CASE = GOLDEN / "version-and-port-policy"
ENV = "prod"
FQDN = "cart.shop.svc.cluster.local"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

for _module in ("envoy.config.cluster.v3.cluster_pb2", "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
                "envoy.extensions.transport_sockets.tls.v3.tls_pb2"):
    importlib.import_module(_module)  # registers the messages the clusters' Any fields name


def compile_case(tmp_path: Path, rewrite) -> dict[str, dict]:
    """The case compiled by `meshc compile` with `rewrite(spec)` applied to its prod environment:
    kind ("clusters", ...) → the DiscoveryResponse of envoy/<kind>.json."""
    repo = tmp_path / "repo"
    shutil.copytree(CASE, repo, ignore=shutil.ignore_patterns("expected*"))
    path = repo / "environments" / f"{ENV}.yaml"
    document = yaml.safe_load(path.read_text())
    rewrite(document["spec"])
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    code, stderr = run_cli(["compile", "--repo", str(repo), "--out", str(tmp_path / "rendered"), "--env", ENV, "--no-cache"])
    assert code == 0, stderr
    envoy_dir = tmp_path / "rendered" / ENV / "envoy"
    return {p.stem: json.loads(p.read_text()) for p in sorted(envoy_dir.glob("*.json"))}


def listen_on(address: str):
    def rewrite(spec: dict) -> None:
        spec["envoy"] = {"listenerAddress": address}
    return rewrite


def active_clusters(proxy: Envoy) -> dict[str, dict]:
    return {entry["cluster"]["name"]: entry["cluster"] for config in proxy.config_dump()["configs"]
            for entry in config.get("dynamic_active_clusters", ())}


def cluster(name: str, port: int = 8080) -> str:
    return f"outbound|{port}|{name}|{FQDN}"


def lb_policy(c: dict) -> str:
    return c.get("lb_policy", "ROUND_ROBIN")  # the enum's zero value, which the dump leaves out


def common_options(c: dict) -> dict:
    return c.get("typed_extension_protocol_options", {}).get(HTTP_OPTIONS, {}).get("common_http_protocol_options", {})


def test_every_cluster_parses_strictly(tmp_path):
    """Into Envoy's own Cluster message, unknown fields refused (the real Envoy below refuses them too)."""
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    for resource in compile_case(tmp_path, listen_on(unique_loopback()))["clusters"]["resources"]:
        body = {k: v for k, v in resource.items() if k != "@type"}
        json_format.ParseDict(body, Cluster(), ignore_unknown_fields=False)


def test_envoy_applies_each_clusters_own_policy(tmp_path):
    files = compile_case(tmp_path, listen_on(unique_loopback()))
    expected = {r["name"] for r in files["clusters"]["resources"]}
    with Envoy(file_bootstrap(files, tmp_path / "envoy"), tmp_path / "envoy") as proxy:
        clusters = proxy.wait_until(lambda: (c := active_clusters(proxy)) and expected <= set(c) and c,
                                    message="every cluster active")
        log = proxy.log_text()
    assert "deprecated" not in log.lower(), log

    # The service's balancer and warmup on v1; v2's own, its warmup merged in by the prod override.
    v1, v2, v3 = clusters[cluster("v1")], clusters[cluster("v2")], clusters[cluster("v3")]
    assert lb_policy(v1) == "LEAST_REQUEST"
    assert v1["least_request_lb_config"]["slow_start_config"]["slow_start_window"] == "60s"
    assert lb_policy(v2) == "ROUND_ROBIN"
    assert v2["round_robin_lb_config"]["slow_start_config"]["slow_start_window"] == "120s"
    assert v2["round_robin_lb_config"]["slow_start_config"]["aggression"]["default_value"] == 1
    assert v2["round_robin_lb_config"]["slow_start_config"]["min_weight_percent"]["value"] == 10

    # The service's pool: keepalive (probes from the override), idle timeout, circuit breaker, h2 upgrade.
    keepalive = {"keepalive_probes": 3, "keepalive_time": 7200, "keepalive_interval": 75}
    for c in (v1, v3, clusters[cluster("")]):
        assert c["upstream_connection_options"]["tcp_keepalive"] == keepalive
        assert common_options(c)["idle_timeout"] == "3600s"
        assert c["circuit_breakers"]["thresholds"][0]["max_connections"] == 100
        assert "http2_protocol_options" in c["typed_extension_protocol_options"][HTTP_OPTIONS]["explicit_http_config"]
    # v2's own connectionPool replaces the service's whole: no keepalive, no idle timeout, HTTP/1.1.
    assert "upstream_connection_options" not in v2
    assert common_options(v2) == {"max_requests_per_connection": 100}
    assert v2["circuit_breakers"]["thresholds"][0]["max_connections"] == 4294967295
    assert "http_protocol_options" in v2["typed_extension_protocol_options"][HTTP_OPTIONS]["explicit_http_config"]
    # v3 sets only outlierDetection.
    assert v3["outlier_detection"]["consecutive_5xx"] == 2 and v1["outlier_detection"]["consecutive_5xx"] == 5

    # Port 9090 has a policy of its own, used instead of the service's on every cluster of that port.
    for version in ("", "v1", "v3"):
        admin = clusters[cluster(version, 9090)]
        assert lb_policy(admin) == "RANDOM"
        assert admin["circuit_breakers"]["thresholds"][0]["max_connections"] == 10
        assert admin["upstream_connection_options"]["tcp_keepalive"] == {"keepalive_time": 600}
        assert common_options(admin) == {"idle_timeout": "300s", "max_requests_per_connection": 1}
    assert "outlier_detection" not in clusters[cluster("", 9090)]  # the port's policy leaves it out
    # v2 on port 9090: the port's policy, then v2's loadBalancer and connectionPool over it.
    admin_v2 = clusters[cluster("v2", 9090)]
    assert lb_policy(admin_v2) == "ROUND_ROBIN" and common_options(admin_v2) == {"max_requests_per_connection": 100}
    assert admin_v2["transport_socket"]["name"] == "envoy.transport_sockets.tls"  # the port's tls stays

    # The TCP service: an empty tcpKeepalive turns keepalive on with the OS's values; its replica probes sooner.
    db = {name: c for name, c in clusters.items() if "orders-db" in name}
    assert db["outbound|5432|primary|orders-db.shop.svc.cluster.local"]["upstream_connection_options"] == {"tcp_keepalive": {}}
    assert db["outbound|5432|replica|orders-db.shop.svc.cluster.local"]["upstream_connection_options"]["tcp_keepalive"] == {
        "keepalive_probes": 3, "keepalive_time": 60, "keepalive_interval": 10}


IDLE_TIMEOUT_S = 1


@pytest.fixture
def backends():
    started = {v: Backend(f"cart-{v}").start() for v in ("v1", "v2", "v3")}
    yield started
    for backend in started.values():
        backend.stop()


def test_the_idle_timeout_closes_only_the_connections_of_clusters_whose_policy_has_it(tmp_path, backends):
    """v1 takes the service's pool (a short idle timeout, for the test); v2's own pool has none."""
    address = unique_loopback()

    def rewrite(spec: dict) -> None:
        listen_on(address)(spec)
        spec["endpoints"]["shop/cart"] = {v: [b.address] for v, b in backends.items()}
        cart = spec["overrides"]["shop/cart"]
        cart["traffic"] = {"split": {"v1": 50, "v2": 50, "v3": 0}}
        cart["tls"] = {"mode": "DISABLE"}  # no mesh CA here; the backends speak plain HTTP/1.1
        cart["connectionPool"]["http"] = {"idleTimeout": f"{IDLE_TIMEOUT_S}s", "h2UpgradePolicy": "DEFAULT"}

    files = compile_case(tmp_path, rewrite)
    with Envoy(file_bootstrap(files, tmp_path / "envoy"), tmp_path / "envoy") as proxy:
        proxy.wait_until(lambda: proxy.listener_address(f"{address}_8080"), message="listener 8080 active")
        url = f"http://{proxy.listener_address(f'{address}_8080')}/"
        counts = count_responses(url, 40, headers={"host": "cart.shop"})
        assert counts["cart-v1"] and counts["cart-v2"] and set(counts) == {"cart-v1", "cart-v2"}, counts

        def stat(version: str, name: str) -> int:
            return proxy.stat(f"cluster.{cluster(version)}.{name}")

        proxy.wait_until(lambda: stat("v1", "upstream_cx_idle_timeout") >= 1, timeout=10 * IDLE_TIMEOUT_S,
                         message="v1's upstream connection closed as idle")
        assert stat("v1", "upstream_cx_active") == 0
        time.sleep(IDLE_TIMEOUT_S)  # as long again: v2's connection outlives v1's timeout
        assert stat("v2", "upstream_cx_idle_timeout") == 0
        assert stat("v2", "upstream_cx_active") >= 1
