"""Smoke tests for tests/support: a real Envoy splitting traffic over real backends."""

from __future__ import annotations

import math

import pytest

from support.backends import Backend, free_port, unique_loopback
from support.envoy import Envoy, EnvoyError, count_responses, http_get

REQUESTS = 400
LISTENER = "smoke_http"


def static_cluster(name: str, backend: Backend) -> dict:
    endpoint = {"address": {"socket_address": {"address": backend.host,
                                               "port_value": backend.port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
    }


def split_route(weights: dict[str, int]) -> dict:
    clusters = [{"name": name, "weight": weight} for name, weight in weights.items()]
    return {
        "match": {"prefix": "/"},
        "route": {"weighted_clusters": {"clusters": clusters},
                  "retry_policy": {"retry_on": "5xx", "num_retries": 2}},
    }


def http_listener(host: str, port: int, routes: list[dict]) -> dict:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "smoke",
        "route_config": {"name": "smoke_routes",
                         "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/"
                                      "envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    return {
        "name": LISTENER,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": manager}]}],
    }


def split_bootstrap(host: str, port: int, v1: Backend, v2: Backend) -> dict:
    return {"static_resources": {
        "listeners": [http_listener(host, port, [split_route({"v1": 50, "v2": 50})])],
        "clusters": [static_cluster("v1", v1), static_cluster("v2", v2)],
    }}


def within_binomial(count: int, n: int, p: float, sigmas: float = 5) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_weighted_split_through_real_envoy(tmp_path):
    host = unique_loopback()
    with Backend("v1") as v1, Backend("v2", fail_first=1) as v2:
        bootstrap = split_bootstrap(host, free_port(host), v1, v2)
        with Envoy(bootstrap, tmp_path) as envoy:
            url = f"http://{envoy.listener_address(LISTENER)}/"
            counts = count_responses(url, REQUESTS)
            stats = envoy.stats()
            dump = envoy.config_dump(include_eds=True)
            status, body, headers = http_get(url)

    assert set(counts) == {"v1", "v2"}, counts
    assert sum(counts.values()) == REQUESTS
    assert within_binomial(counts["v1"], REQUESTS, 0.5), counts
    assert v2.requests == counts["v2"] + 1 + (body == "v2")
    assert stats["cluster.v2.upstream_rq_retry"] >= 1
    assert LISTENER in str(dump)
    assert status == 200 and headers["x-backend"] == body


def test_unknown_bootstrap_field_fails_start(tmp_path):
    host = unique_loopback()
    with Backend("v1") as v1:
        bootstrap = split_bootstrap(host, free_port(host), v1, v1)
        bootstrap["static_resources"]["clusters"][0]["no_such_field"] = 1
        with pytest.raises(EnvoyError, match="no_such_field"):
            Envoy(bootstrap, tmp_path).start()


def test_unique_loopback_is_distinct():
    hosts = [unique_loopback() for _ in range(50)]
    assert len(set(hosts)) == len(hosts)
    assert all(h.startswith("127.") for h in hosts)
