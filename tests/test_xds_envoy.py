"""End to end: a real Envoy fed by `meshc serve` routes real traffic, and follows file changes.

Each test starts the server in-process (ServerThread), two HTTP backends and
an Envoy whose bootstrap holds only the xDS cluster; the snapshot is the
hand-made one of `compiler.xds.sample` with loopback addresses unique to the
test, so tests run in parallel under pytest-xdist.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from support.backends import Backend, free_port, unique_loopback
from support.envoy import Envoy, count_responses

ENV = "demo"
N = 400


def _within_binomial(count: int, n: int, percent: int) -> bool:
    p = percent / 100
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


class Mesh:
    """Backends v1/v2, the rendered directory, the server, and one Envoy."""

    def __init__(self, tmp_path: Path, v1: Backend, v2: Backend) -> None:
        self.rendered = tmp_path / "rendered"
        self.listen = (unique_loopback(), 0)
        self.listen = (self.listen[0], free_port(self.listen[0]))
        self.backends = {"v1": (v1.host, v1.port), "v2": (v2.host, v2.port)}
        self.url = f"http://{self.listen[0]}:{self.listen[1]}/"

    def resources(self, weights: dict[str, int]) -> dict[str, list[dict]]:
        return sample.sample_resources(self.listen, self.backends, weights)

    def write(self, weights: dict[str, int], **kwargs) -> dict[str, str]:
        resources = self.resources(weights)
        sample.write_snapshot(self.rendered, ENV, resources, **kwargs)
        return {k: sample.response_document(k, v)["version_info"] for k, v in resources.items()}


@pytest.fixture
def mesh(tmp_path):
    with Backend("v1", host=unique_loopback()) as v1, Backend("v2", host=unique_loopback()) as v2:
        yield Mesh(tmp_path, v1, v2)


def _server(mesh: Mesh, **options) -> ServerThread:
    return ServerThread(Options(rendered=mesh.rendered, grpc_port=0, http_port=0,
                                rest_refresh_delay="0.2s", **options))


def _dynamic_version(envoy: Envoy, section: str) -> str:
    """version_info of the first dynamic resource in a config_dump section (e.g. routes)."""
    dump = envoy.config_dump(include_eds=section == "endpoint")
    for config in dump["configs"]:
        if config["@type"].endswith(f".{section.capitalize()}sConfigDump") or \
           config["@type"].endswith(f".{section.capitalize()}ConfigDump"):
            for key in ("dynamic_route_configs", "dynamic_active_clusters",
                        "dynamic_listeners", "dynamic_endpoint_configs"):
                for item in config.get(key, []):
                    return item.get("version_info") or item.get("active_state", {}).get("version_info", "")
    return ""


def _split(mesh: Mesh, envoy: Envoy) -> Counter:
    envoy.wait_until(lambda: count_responses(mesh.url, 1)["v1"] + count_responses(mesh.url, 1)["v2"],
                     timeout=10, message="traffic flows")
    return count_responses(mesh.url, N)


class _Traffic(threading.Thread):
    """Requests on one keep-alive connection until stopped; every answer recorded."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.bodies, self.errors = url, Counter(), []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.bodies.update(count_responses(self.url, 20))
            except Exception as exc:        # noqa: BLE001 - recorded, asserted on
                self.errors.append(exc)

    def stop(self) -> Counter:
        self._stop_event.set()
        self.join(10)
        return self.bodies


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_ads_proxy_routes_by_weight_and_follows_changes(mesh, tmp_path, delta):
    mesh.write({"v1": 80, "v2": 20})
    with _server(mesh) as server:
        bootstrap = sample.ads_bootstrap("proxy-1", ENV, ("127.0.0.1", server.server.grpc_port),
                                         delta=delta)
        with Envoy(bootstrap, tmp_path / "envoy") as envoy:
            split = _split(mesh, envoy)
            assert set(split) == {"v1", "v2"} and _within_binomial(split["v2"], N, 20), split

            traffic = _Traffic(mesh.url)
            traffic.start()
            versions = mesh.write({"v1": 10, "v2": 90})
            changed = time.monotonic()
            expected = _route_version(server, versions["routes"], delta)
            envoy.wait_until(lambda: _dynamic_version(envoy, "route") == expected,
                             timeout=5, interval=0.02, message="new routes version")
            assert time.monotonic() - changed < 1.0
            bodies = traffic.stop()
            assert not traffic.errors and set(bodies) <= {"v1", "v2"}, (traffic.errors, bodies)

            split = count_responses(mesh.url, N)
            assert _within_binomial(split["v2"], N, 90), split
            assert envoy.stat("server.envoy_bug_failures") == 0

            # An invalid snapshot on disk (a route naming a missing cluster) is refused:
            # the proxy stays on the last good version and traffic still flows.
            bad = mesh.resources({"v1": 50, "v2": 50})
            bad["routes"][0]["virtual_hosts"][0]["routes"][1]["route"]["weighted_clusters"][
                "clusters"][0]["name"] = "outbound|9080|v9|reviews.bookinfo.svc.cluster.local"
            sample.write_snapshot(mesh.rendered, ENV, bad)
            page = _wait_json(server.http_url + "/debug/snapshots",
                              lambda p: p[ENV]["errors"], message="rejection shows")
            assert "does not exist" in page[ENV]["errors"][0]
            assert page[ENV]["versions"]["routes"] == versions["routes"]
            assert 'meshc_xds_snapshot_valid{env="demo"} 0' in requests.get(
                server.http_url + "/metrics", timeout=5).text
            assert _dynamic_version(envoy, "route") == expected
            assert _within_binomial(count_responses(mesh.url, N)["v2"], N, 90)

            proxies = requests.get(server.http_url + "/debug/proxies", timeout=5).json()
            assert [p["node_id"] for p in proxies] == ["proxy-1"]
            assert proxies[0]["protocol"] == ("delta-ads" if delta else "ads")
            assert proxies[0]["acked"]["routes"] == versions["routes"]


def _route_version(server: ServerThread, type_version: str, delta: bool) -> str:
    """The version Envoy reports for route config 9080 once `type_version` is served.

    SotW reports the type's version_info; Delta each resource's own version.
    """
    def served():
        state = server.server.hub.cache.get(ENV)
        routes = state.snapshot.kinds["routes"]
        return routes.version == type_version and routes.resources["9080"].version

    deadline = time.monotonic() + 5
    while not (resource_version := server.call(served)):
        assert time.monotonic() < deadline, "server did not publish the new routes"
        time.sleep(0.01)
    return resource_version if delta else type_version


def _wait_json(url: str, predicate, timeout: float = 5, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = requests.get(url, timeout=5).json()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message}: {json.dumps(value)[:2000]}")
        time.sleep(0.02)


def test_rest_polling_proxy_routes_and_follows_changes(mesh, tmp_path):
    mesh.write({"v1": 80, "v2": 20})
    with _server(mesh) as server:
        bootstrap = sample.rest_bootstrap("proxy-rest", ENV, ("127.0.0.1", server.server.http_port),
                                          refresh_delay="0.2s")
        with Envoy(bootstrap, tmp_path / "envoy") as envoy:
            split = _split(mesh, envoy)
            assert _within_binomial(split["v2"], N, 20), split

            versions = mesh.write({"v1": 10, "v2": 90})
            changed = time.monotonic()
            envoy.wait_until(lambda: _dynamic_version(envoy, "route") == versions["routes"],
                             timeout=5, interval=0.02, message="new routes version")
            assert time.monotonic() - changed < 1.0
            assert _within_binomial(count_responses(mesh.url, N)["v2"], N, 90)

            proxies = requests.get(server.http_url + "/debug/proxies", timeout=5).json()
            assert {p["protocol"] for p in proxies} == {"rest"}
            # Unchanged versions are answered 304: polling costs no body.
            metrics = requests.get(server.http_url + "/metrics", timeout=5).text
            assert 'meshc_xds_rest_requests_total{code="304",type="clusters"}' in metrics


def _ring_hash_nack(resources: dict) -> None:
    """Make the first cluster one Envoy rejects: a ring whose minimum exceeds its maximum."""
    cluster = resources["clusters"][0]
    cluster["lb_policy"] = "RING_HASH"
    cluster["ring_hash_lb_config"] = {"minimum_ring_size": "4096", "maximum_ring_size": "1024"}


@pytest.mark.parametrize("protocol", ["sotw", "rest"])
def test_nack_is_recorded_and_not_resent(mesh, tmp_path, protocol):
    versions = mesh.write({"v1": 0, "v2": 100})
    with _server(mesh) as server:
        address = ("127.0.0.1", server.server.grpc_port if protocol == "sotw"
                   else server.server.http_port)
        bootstrap = (sample.ads_bootstrap("proxy-nack", ENV, address) if protocol == "sotw"
                     else sample.rest_bootstrap("proxy-nack", ENV, address, refresh_delay="0.1s"))
        with Envoy(bootstrap, tmp_path / "envoy") as envoy:
            assert _split(mesh, envoy) == Counter({"v2": N})

            bad = mesh.resources({"v1": 0, "v2": 100})
            _ring_hash_nack(bad)
            sample.write_snapshot(mesh.rendered, ENV, bad)
            bad_version = sample.response_document("clusters", bad["clusters"])["version_info"]

            proxies = _wait_json(server.http_url + "/debug/proxies",
                                 lambda ps: ps and ps[0]["last_nack"].get("clusters"),
                                 message="NACK recorded")
            nack = proxies[0]["last_nack"]["clusters"]
            assert nack["version"] == bad_version and nack["error"], nack
            assert proxies[0]["acked"]["clusters"] == versions["clusters"]
            metrics = requests.get(server.http_url + "/metrics", timeout=5).text
            assert 'meshc_xds_nacks_total{env="demo",type="clusters"} 1' in metrics

            # No resend loop: over the next half second the server sends nothing more
            # and the NACK count stays at one; the proxy keeps serving the old config.
            before = server.call(_sent_counts, server.server.hub)
            time.sleep(0.5)
            assert server.call(_sent_counts, server.server.hub) == before
            metrics = requests.get(server.http_url + "/metrics", timeout=5).text
            assert 'meshc_xds_nacks_total{env="demo",type="clusters"} 1' in metrics
            assert count_responses(mesh.url, 50) == Counter({"v2": 50})

            # A fixed snapshot is pushed and accepted.
            versions = mesh.write({"v1": 100, "v2": 0})
            envoy.wait_until(lambda: count_responses(mesh.url, 5) == Counter({"v1": 5}),
                             timeout=5, message="traffic moves to v1")


def _sent_counts(hub) -> tuple:
    m = hub.metrics
    return tuple(m.value("meshc_xds_responses_total", env=ENV, type=k, reason=r)
                 for k in ("clusters", "endpoints", "listeners", "routes")
                 for r in ("push", "request")) + (
        m.value("meshc_xds_rest_requests_total", type="clusters", code="200"),)


def _clusters_dump(envoy: Envoy) -> dict:
    """The ClustersConfigDump: dynamic_active_clusters and dynamic_warming_clusters."""
    return next(c for c in envoy.config_dump()["configs"]
                if c["@type"].endswith(".ClustersConfigDump"))


def test_delta_modified_cluster_becomes_active_and_traffic_continues(mesh, tmp_path):
    """A modified EDS cluster warms until it hears its assignment; Delta re-sends it."""
    mesh.write({"v1": 50, "v2": 50})
    with _server(mesh) as server:
        bootstrap = sample.ads_bootstrap("proxy-delta", ENV, ("127.0.0.1", server.server.grpc_port),
                                         delta=True)
        with Envoy(bootstrap, tmp_path / "envoy") as envoy:
            assert set(_split(mesh, envoy)) == {"v1", "v2"}
            traffic = _Traffic(mesh.url)
            traffic.start()
            changed = mesh.resources({"v1": 50, "v2": 50})
            for cluster in changed["clusters"]:
                cluster["lb_policy"] = "LEAST_REQUEST"
                cluster["connect_timeout"] = "2s"
            sample.write_snapshot(mesh.rendered, ENV, changed)
            want = sample.response_document("clusters", changed["clusters"])["version_info"]

            def served() -> dict[str, str]:    # Delta: Envoy reports each resource's version
                clusters = server.server.hub.cache.get(ENV).snapshot.kinds["clusters"]
                return clusters.version == want and {n: r.version
                                                     for n, r in clusters.resources.items()}

            deadline = time.monotonic() + 5
            while not (versions := server.call(served)):
                assert time.monotonic() < deadline, "server did not publish the new clusters"
                time.sleep(0.01)

            def active() -> bool:
                dump = _clusters_dump(envoy)
                clusters = dump.get("dynamic_active_clusters", [])
                return (not dump.get("dynamic_warming_clusters")
                        and {c["cluster"]["name"]: c["version_info"] for c in clusters} == versions
                        and all(c["cluster"]["lb_policy"] == "LEAST_REQUEST" for c in clusters))

            # Envoy's initial_fetch_timeout (15 s) would end a stuck warm-up; well before it:
            envoy.wait_until(active, timeout=5, interval=0.05,
                             message="modified clusters active, none warming")
            assert envoy.stat("cluster_manager.warming_clusters") == 0
            split = count_responses(mesh.url, N)
            bodies = traffic.stop()
            assert not traffic.errors and set(bodies) <= {"v1", "v2"}, (traffic.errors, bodies)
            assert set(split) == {"v1", "v2"} and _within_binomial(split["v2"], N, 50), split
            assert envoy.stat("cluster.{}.upstream_cx_connect_fail".format(
                sample.cluster_name("v1"))) == 0


def test_envoy_labels_its_prometheus_statistics_by_the_whole_cluster_name(mesh, tmp_path):
    """The sample bootstraps' stats_config (istiod's cluster_name tag): Prometheus sees
    `envoy_cluster_upstream_rq_xx{cluster_name="outbound|9080|v2|reviews...."}`, which
    `meshc canary` will read; Envoy's default tag would cut the name at its first dot."""
    mesh.write({"v1": 0, "v2": 100})
    with _server(mesh) as server:
        bootstrap = sample.ads_bootstrap("proxy-1", ENV, ("127.0.0.1", server.server.grpc_port))
        with Envoy(bootstrap, tmp_path / "envoy") as envoy:
            envoy.wait_until(lambda: count_responses(mesh.url, 1) == {"v2": 1}, message="routed to v2")
            count_responses(mesh.url, 9)
            text = envoy.get("/stats/prometheus").text
    label = f'cluster_name="{sample.cluster_name("v2")}"'
    lines = [line for line in text.splitlines() if line.startswith("envoy_cluster_upstream_rq_xx{") and label in line]
    assert any('envoy_response_code_class="2"' in line and line.rsplit(" ", 1)[1] == "10" for line in lines), lines


def test_the_deploy_bootstraps_tag_statistics_as_the_sample_ones_do():
    import yaml

    for name in ("ads.yaml", "delta-ads.yaml", "rest.yaml"):
        bootstrap = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "envoy" / name).read_text())
        assert bootstrap["stats_config"] == sample.STATS_CONFIG, name
