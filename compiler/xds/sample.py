"""A small hand-made snapshot in the emitted format, for tests, the demo and the benchmark.

Like go-control-plane's `pkg/test/resource`, this builds resources directly
(it is not the compiler's Envoy target and imports nothing from it): one
listener, one route configuration splitting traffic by weight between the
two versions of `reviews`, two EDS clusters and their load assignments. The
files it writes have exactly the shape `rendered/<env>/envoy/*.json` has.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from compiler.xds.resources import TYPE_URLS, content_version

__all__ = ["SERVICE", "ads_bootstrap", "cluster_name", "rest_bootstrap", "sample_resources",
           "write_snapshot"]

SERVICE = "reviews.bookinfo.svc.cluster.local"
PORT = 9080
_ADS = {"ads": {}, "resource_api_version": "V3"}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def cluster_name(version: str) -> str:
    return f"outbound|{PORT}|{version}|{SERVICE}"


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def sample_resources(listen: tuple[str, int], backends: Mapping[str, tuple[str, int]],
                     weights: Mapping[str, int]) -> dict[str, list[dict]]:
    """Resources per kind: a listener on `listen` routing to `backends` by `weights`.

    A request with `x-canary: on` goes to the last version in `weights`.
    """
    listener = {
        "@type": TYPE_URLS["listeners"],
        "name": f"{listen[0]}_{listen[1]}",
        "address": _address(*listen),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": _HCM,
                "stat_prefix": f"outbound_{listen[0]}_{listen[1]}",
                "rds": {"route_config_name": str(PORT), "config_source": _ADS},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": _ROUTER}}],
            },
        }]}],
    }
    canary = list(weights)[-1]
    route_config = {
        "@type": TYPE_URLS["routes"],
        "name": str(PORT),
        "validate_clusters": False,
        "virtual_hosts": [{
            "name": f"{SERVICE}:{PORT}",
            "domains": ["*"],
            "routes": [
                {"match": {"prefix": "/", "headers": [{"name": "x-canary",
                                                       "string_match": {"exact": "on"}}]},
                 "route": {"cluster": cluster_name(canary)}},
                {"match": {"prefix": "/"},
                 "route": {"weighted_clusters": {"clusters": [
                     {"name": cluster_name(v), "weight": w} for v, w in weights.items() if w]}}},
            ],
        }],
    }
    clusters = [{
        "@type": TYPE_URLS["clusters"],
        "name": cluster_name(version),
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ADS},
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
    } for version in sorted(backends)]
    endpoints = [{
        "@type": TYPE_URLS["endpoints"],
        "cluster_name": cluster_name(version),
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
    } for version, (host, port) in sorted(backends.items())]
    return {"clusters": sorted(clusters, key=lambda c: c["name"]), "endpoints": endpoints,
            "listeners": [listener], "routes": [route_config]}


def response_document(kind: str, resources: list[dict]) -> dict:
    """The DiscoveryResponse JSON for one kind; version_info hashes the canonical resources."""
    return {"version_info": content_version(TYPE_URLS[kind], resources), "type_url": TYPE_URLS[kind],
            "resources": resources}


def write_snapshot(rendered: Path, env: str, resources: Mapping[str, list[dict]],
                   *, only: tuple[str, ...] | None = None) -> None:
    """Write `rendered/<env>/envoy/<kind>.json` for each kind (or only those in `only`).

    Each file is written to a temporary name and renamed, as `meshc compile` does.
    """
    envoy_dir = rendered / env / "envoy"
    envoy_dir.mkdir(parents=True, exist_ok=True)
    for kind, items in resources.items():
        if only is not None and kind not in only:
            continue
        text = json.dumps(response_document(kind, list(items)), indent=2, sort_keys=True) + "\n"
        tmp = envoy_dir / f".{kind}.json.tmp"
        tmp.write_text(text)
        os.replace(tmp, envoy_dir / f"{kind}.json")


def _xds_cluster(host: str, port: int, http2: bool) -> dict:
    cluster = {
        "name": "xds_cluster",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


#: Envoy's statistics tagged as istiod's bootstrap tags them: the whole cluster name
#: (`outbound|9080|v2|reviews.bookinfo.svc.cluster.local`) becomes the `cluster_name` label,
#: where Envoy's default tag would cut it at its first dot. What `meshc canary` reads.
STATS_CONFIG = {"stats_tags": [{"tag_name": "cluster_name",
                                "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"}]}


def ads_bootstrap(node_id: str, env: str, server: tuple[str, int], *, delta: bool = False,
                  service: str = "") -> dict:
    """An Envoy bootstrap whose only static resource is the ADS cluster for `server`; with
    `service` ("ns/name"), its node says which service it runs, which scopes what it receives."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": env, **({"metadata": {"service": service}} if service else {})},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC" if delta else "GRPC",
                           "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                           "set_node_on_first_message_only": True},
            "cds_config": ads,
            "lds_config": ads,
        },
        "static_resources": {"clusters": [_xds_cluster(*server, http2=True)]},
        "stats_config": STATS_CONFIG,
    }


def rest_bootstrap(node_id: str, env: str, server: tuple[str, int], *,
                   refresh_delay: str = "1s") -> dict:
    """An Envoy bootstrap polling CDS and LDS over REST-JSON from `server` (the HTTP port).

    RDS and EDS follow the config sources `meshc serve` rewrites into each
    response, naming the cluster given by `--rest-xds-cluster` (here `xds_cluster`).
    """
    rest = {"api_config_source": {"api_type": "REST", "transport_api_version": "V3",
                                  "cluster_names": ["xds_cluster"],
                                  "refresh_delay": refresh_delay},
            "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": env},
        "dynamic_resources": {"cds_config": rest, "lds_config": rest},
        "static_resources": {"clusters": [_xds_cluster(*server, http2=False)]},
        "stats_config": STATS_CONFIG,
    }
