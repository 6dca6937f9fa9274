"""A real Envoy (1.40, --reject-unknown-dynamic-fields) loads the Envoy target's output and routes by it.

The example repository (`policies/`, `environments/`) is compiled through
the whole pipeline with one environment file rewritten for the test: its
`envoy.listenerAddress` is a loopback address of this test's own and, for
the behaviour tests, its `endpoints` are real HTTP backends on 127.0.0.1.
The behaviour tests serve the rendered files to Envoy with `meshc serve`
over ADS, untouched; the acceptance tests load them from files (see
`envoy_static`), which needs no secrets server for the TLS clusters.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from compiler.emit import file_bytes
from compiler.load import Source, source_from_dir
from compiler.pipeline import compile_source
from compiler.targets import envoy as envoy_target
from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from envoy_meshes import kitchen_sink
from envoy_static import file_bootstrap
from support.backends import Backend, unique_loopback
from support.envoy import Envoy, count_responses, http_get

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ENVIRONMENTS = ("dev", "prod", "staging")
BOOTSTRAP_CLUSTERS = {"meshc-xds", "xds_cluster"}  # the xDS server's own cluster, not ours
SIGMAS = 4.5  # binomial tolerance: a correct split fails this about once in 150,000 runs


def envoy_files(outputs: dict[str, bytes]) -> dict[str, dict]:
    """kind → DiscoveryResponse, from one environment's rendered files."""
    return {path.removeprefix("envoy/").removesuffix(".json"): json.loads(data)
            for path, data in outputs.items() if path.startswith("envoy/")}


def names(files: dict[str, dict], kind: str) -> set[str]:
    return {r["name"] for r in files[kind]["resources"]}


def dumped(dump: dict) -> dict[str, set[str]]:
    """Names of the listeners, clusters and route configurations in a /config_dump."""
    sections = {"ListenersConfigDump": ("listeners", ["static_listeners", "dynamic_listeners"]),
                "ClustersConfigDump": ("clusters", ["static_clusters", "dynamic_active_clusters"]),
                "RoutesConfigDump": ("routes", ["static_route_configs", "dynamic_route_configs"])}
    out: dict[str, set[str]] = {"listeners": set(), "clusters": set(), "routes": set()}
    for config in dump["configs"]:
        kind, keys = sections.get(config["@type"].rsplit(".", 1)[1], (None, []))
        for key in keys:
            for entry in config.get(key, ()):
                inner = entry.get("active_state", entry)
                resource = next(v for k, v in inner.items() if k in ("listener", "cluster", "route_config"))
                out[kind].add(resource["name"])
    return out


def compile_example(env: str, rewrite) -> tuple:
    """Compile the example repo with `rewrite(spec)` applied to environments/<env>.yaml.

    Returns the environment's Mesh and its rendered files (path → bytes).
    """
    source = source_from_dir(REPO)
    path = f"environments/{env}.yaml"
    document = yaml.safe_load(source.files[path])
    rewrite(document["spec"])
    files = {**source.files, path: yaml.safe_dump(document, sort_keys=False).encode()}
    result = compile_source(Source(files), envs=[env])
    assert result.ok, [d.render() for d in result.diagnostics]
    return result.meshes[env], result.outputs[env]


def listen_on(address: str):
    def rewrite(spec: dict) -> None:
        spec.setdefault("envoy", {})["listenerAddress"] = address
    return rewrite


def assert_loaded(proxy: Envoy, files: dict[str, dict]) -> None:
    proxy.wait_until(lambda: dumped(proxy.config_dump())["listeners"] == names(files, "listeners"),
                     message="every listener active")
    dump = dumped(proxy.config_dump())
    assert dump["listeners"] == names(files, "listeners")
    assert dump["clusters"] - BOOTSTRAP_CLUSTERS == names(files, "clusters")
    assert dump["routes"] == names(files, "routes")
    assert "deprecated" not in proxy.log_text().lower(), proxy.log_text()


# --- Envoy accepts the output -------------------------------------------------------------


def test_envoy_accepts_every_feature(tmp_path):
    files = {f.path.removeprefix("envoy/").removesuffix(".json"): json.loads(file_bytes(f))
             for f in envoy_target.lower(kitchen_sink(unique_loopback())).files}
    with Envoy(file_bootstrap(files, tmp_path), tmp_path) as proxy:
        assert_loaded(proxy, files)


@pytest.mark.parametrize("env", EXAMPLE_ENVIRONMENTS)
def test_envoy_accepts_each_example_environment(env, tmp_path):
    _, outputs = compile_example(env, listen_on(unique_loopback()))
    files = envoy_files(outputs)
    with Envoy(file_bootstrap(files, tmp_path), tmp_path) as proxy:
        assert_loaded(proxy, files)


# --- Envoy routes by the policy -------------------------------------------------------------

ENV = "staging"
BACKENDS = {  # service → version → backend options; each answers with its name
    "bookinfo/reviews": {"v1": {}, "v2": {}, "v3": {}},
    "bookinfo/ratings": {"v1": {"delay": 5.0}, "v2": {"delay": 5.0}},   # slower than its timeout
    "bookinfo/details": {"v1": {"fail_first": 1}},                     # retried on 5xx
    "bookinfo/productpage": {"v1": {"fail_first": 1}},                 # not retried on 5xx
    "bookinfo/mongodb": {"": {}},
}


class Staging:
    """The staging environment, compiled and loaded into a real Envoy in front of real backends."""

    def __init__(self, mesh, proxy: Envoy, backends: dict[str, dict[str, Backend]]) -> None:
        self.mesh, self.proxy, self.backends = mesh, proxy, backends
        self.address = proxy.listener_address(f"{mesh.environment.envoy.listener_address}_9080")

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}{path}"


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    backends = {key: {v: Backend(f"{key.split('/')[1]}-{v}" if v else key, **options)
                      for v, options in versions.items()}
                for key, versions in BACKENDS.items()}
    started = [b.start() for versions in backends.values() for b in versions.values()]
    address = unique_loopback()

    def rewrite(spec: dict) -> None:
        listen_on(address)(spec)
        spec["endpoints"] = {key: {v: [b.address] for v, b in versions.items()} if "" not in versions
                             else [versions[""].address] for key, versions in backends.items()}
        # No mesh CA here to issue ISTIO_MUTUAL certificates: reviews is plain HTTP in this test.
        spec.setdefault("overrides", {}).setdefault("bookinfo/reviews", {})["tls"] = {"mode": "DISABLE"}

    try:
        mesh, outputs = compile_example(ENV, rewrite)
        rendered = tmp_path_factory.mktemp("rendered")
        for path, data in outputs.items():
            (rendered / ENV / path).parent.mkdir(parents=True, exist_ok=True)
            (rendered / ENV / path).write_bytes(data)
        with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0)) as server:
            bootstrap = sample.ads_bootstrap("behaviour", ENV, ("127.0.0.1", server.server.grpc_port))
            with Envoy(bootstrap, tmp_path_factory.mktemp("envoy")) as proxy:
                assert_loaded(proxy, envoy_files(outputs))
                yield Staging(mesh, proxy, backends)
    finally:
        for backend in started:
            backend.stop()


def test_canary_weight_shows_in_the_split(staging):
    canary = staging.mesh.service("bookinfo/reviews").traffic.canary
    n, p = 2000, canary.weight / 100
    counts = count_responses(staging.url(), n, headers={"host": "reviews.bookinfo"})
    assert set(counts) <= {"reviews-v1", f"reviews-{canary.version}"}, counts
    tolerance = SIGMAS * math.sqrt(n * p * (1 - p))
    assert abs(counts[f"reviews-{canary.version}"] - n * p) <= tolerance, (counts, tolerance)


def test_canary_header_always_reaches_the_canary(staging):
    reviews = staging.mesh.service("bookinfo/reviews")
    headers = {"host": "reviews.bookinfo.svc.cluster.local:9080",
               **{m.header: m.value for m in reviews.traffic.match}}
    counts = count_responses(staging.url(), 200, headers=headers)
    assert counts == {f"reviews-{reviews.traffic.match_version}": 200}


def test_a_backend_slower_than_the_timeout_gives_504(staging):
    timeout = staging.mesh.service("bookinfo/ratings").timeout_ms / 1000
    start = time.monotonic()
    status, body, _ = http_get(staging.url(), headers={"host": "ratings"}, timeout=10 * timeout)
    elapsed = time.monotonic() - start
    assert status == 504 and body == "upstream request timeout"
    assert timeout * 0.9 <= elapsed < 5 * timeout


def test_a_backend_that_fails_once_is_retried_when_the_policy_says_5xx(staging):
    assert "5xx" in staging.mesh.service("bookinfo/details").retries.retry_on
    details = staging.backends["bookinfo/details"]["v1"]
    status, body, _ = http_get(staging.url("/retried"), headers={"host": "details.bookinfo"})
    assert (status, body) == (200, "details-v1")
    assert details.paths == ["/retried", "/retried"]


def test_a_5xx_is_not_retried_when_the_policy_does_not_say_so(staging):
    assert "5xx" not in staging.mesh.service("bookinfo/productpage").retries.retry_on
    productpage = staging.backends["bookinfo/productpage"]["v1"]
    productpage.reset()
    status, body, _ = http_get(staging.url("/once"), headers={"host": "productpage"})
    assert (status, body) == (503, "productpage-v1")
    assert productpage.paths == ["/once"]


def test_ingress_host_reaches_its_service_through_the_gateway_listener(staging):
    ingress = staging.mesh.service("bookinfo/productpage").ingress
    gateway = staging.proxy.listener_address(f"{staging.mesh.environment.envoy.listener_address}_{ingress.port}")
    status, body, _ = http_get(f"http://{gateway}/", headers={"host": ingress.hosts[0]})
    assert body == "productpage-v1", (status, body)
    status, _, _ = http_get(f"http://{gateway}/", headers={"host": "reviews.bookinfo"})
    assert status == 404  # only the ingress hosts are routed at the gateway


def test_the_example_shares_its_ingress_host_by_path(staging):
    """ratings serves its public API on productpage's host, under /api/v1/ratings."""
    ingress = staging.mesh.service("bookinfo/ratings").ingress
    gateway = staging.proxy.listener_address(f"{staging.mesh.environment.envoy.listener_address}_{ingress.port}")
    ratings = staging.backends["bookinfo/ratings"].values()
    for backend in ratings:
        backend.reset()
    status, body, _ = http_get(f"http://{gateway}{ingress.paths[0]}/0", headers={"host": ingress.hosts[0]})
    # Its backends here answer slower than its 1s timeout: the 504 is ratings' route's own.
    assert (status, body) == (504, "upstream request timeout")
    assert sorted(p for b in ratings for p in b.paths) == [f"{ingress.paths[0]}/0"]
    productpage = staging.backends["bookinfo/productpage"]["v1"]
    productpage.reset()
    _, body, _ = http_get(f"http://{gateway}/api/v1/products", headers={"host": ingress.hosts[0]})
    assert body == "productpage-v1" and productpage.paths == ["/api/v1/products"]  # the rest of the host is productpage's


# --- an environment's patches on Envoy resources reach Envoy ------------------------------


def test_envoy_patches_reach_a_real_envoy(tmp_path):
    """A Cluster patch and a RouteConfiguration patch, compiled, loaded by Envoy as written."""
    cluster = "outbound|9080|v1|ratings.bookinfo.svc.cluster.local"

    def rewrite(spec: dict) -> None:
        listen_on(unique_loopback())(spec)
        spec["patches"] = [
            {"target": {"kind": "Cluster", "name": cluster},
             "ops": [{"op": "replace", "path": "/connect_timeout", "value": "0.123s"}]},
            {"target": {"kind": "RouteConfiguration", "name": "9080"},
             "ops": [{"op": "add", "path": "/virtual_hosts/0/request_headers_to_add",
                      "value": [{"header": {"key": "x-patched", "value": "yes"}}]}]},
        ]

    _, outputs = compile_example("staging", rewrite)
    files = envoy_files(outputs)
    with Envoy(file_bootstrap(files, tmp_path), tmp_path) as proxy:
        assert_loaded(proxy, files)
        dump = proxy.config_dump()
    clusters = {entry["cluster"]["name"]: entry["cluster"] for config in dump["configs"]
                for entry in config.get("dynamic_active_clusters", ())}
    assert clusters[cluster]["connect_timeout"] == "0.123s"
    assert {c["connect_timeout"] for name, c in clusters.items() if name != cluster} != {"0.123s"}
    routes = [entry["route_config"] for config in dump["configs"]
              for key in ("static_route_configs", "dynamic_route_configs") for entry in config.get(key, ())]
    [port_9080] = [r for r in routes if r["name"] == "9080"]
    assert port_9080["virtual_hosts"][0]["request_headers_to_add"][0]["header"] == {"key": "x-patched", "value": "yes"}
