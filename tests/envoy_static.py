"""Load emitted Envoy files into a bootstrap, without an xDS server.

`meshc serve` ignores SDS requests (secrets are not in the repo), so a proxy
it feeds waits Envoy's 15 s `initial_fetch_timeout` for every TLS cluster;
these loaders let the acceptance tests check TLS clusters in milliseconds.

The resources are used unchanged except where they refer to one another
over ADS: a listener's `rds` becomes the inline `route_config` it names, and
an EDS cluster becomes STATIC with its ClusterLoadAssignment inline.

`static_bootstrap` puts them in `static_resources`. Clusters whose TLS
secrets come over ADS (SDS) cannot be static: Envoy 1.40 crashes (SIGSEGV)
creating a bootstrap cluster whose SDS config source is ADS, because the
ADS stream does not exist yet at that point. `file_bootstrap` therefore
loads listeners and clusters as dynamic resources from files instead
(filesystem LDS/CDS, which read DiscoveryResponse JSON), after the ADS
stream is set up, the way they arrive from a real xDS server.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from support.backends import free_port

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def static_bootstrap(files: dict[str, dict]) -> dict:
    """`files`: kind ("clusters", ...) → DiscoveryResponse dict."""
    routes = {r["name"]: _bare(r) for r in files["routes"]["resources"]}
    assignments = {e["cluster_name"]: _bare(e) for e in files["endpoints"]["resources"]}
    listeners = [_inline_routes(_bare(r), routes) for r in files["listeners"]["resources"]]
    clusters = [_inline_endpoints(_bare(r), assignments) for r in files["clusters"]["resources"]]
    return {"node": {"id": "meshc-test", "cluster": "test"},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def file_bootstrap(files: dict[str, dict], workdir: Path, sds_fetch_timeout: str = "0.1s") -> dict:
    """Listeners and clusters over filesystem xDS (`workdir/lds.json`, `cds.json`), SDS over an idle ADS.

    Nothing here serves secrets, so a TLS cluster would warm for Envoy's
    default 15 s: the one change to the resources is a short
    `initial_fetch_timeout` on their SDS config sources.
    """
    static = static_bootstrap(files)["static_resources"]
    for cluster in static["clusters"]:
        for source in _sds_sources(cluster):
            source["initial_fetch_timeout"] = sds_fetch_timeout
    workdir.mkdir(parents=True, exist_ok=True)
    sources = {}
    for kind, type_url, items in (("lds", files["listeners"]["type_url"], static["listeners"]),
                                  ("cds", files["clusters"]["type_url"], static["clusters"])):
        path = workdir / f"{kind}.json"
        path.write_text(json.dumps({"version_info": "1", "type_url": type_url,
                                    "resources": [{"@type": type_url, **r} for r in items]}))
        sources[f"{kind}_config"] = {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}
    return {"node": {"id": "meshc-test", "cluster": "test"},
            "static_resources": {"clusters": [_unreachable_xds_cluster()]},
            "dynamic_resources": {**sources, "ads_config": _ADS_CONFIG}}


_ADS_CONFIG = {"api_type": "GRPC", "transport_api_version": "V3",
               "grpc_services": [{"envoy_grpc": {"cluster_name": "meshc-xds"}}]}


def _sds_sources(value):
    """Every `sds_config` inside a resource (recursively)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "sds_config":
                yield inner
            else:
                yield from _sds_sources(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _sds_sources(inner)


def _bare(resource: dict) -> dict:
    """A resource without its Any `@type` (bootstrap fields are typed already)."""
    return {k: v for k, v in copy.deepcopy(resource).items() if k != "@type"}


def _inline_routes(listener: dict, routes: dict[str, dict]) -> dict:
    for chain in listener.get("filter_chains", ()):
        for network_filter in chain["filters"]:
            config = network_filter["typed_config"]
            if config["@type"] == HCM and "rds" in config:
                config["route_config"] = routes[config.pop("rds")["route_config_name"]]
    return listener


def _inline_endpoints(cluster: dict, assignments: dict[str, dict]) -> dict:
    if cluster.get("type") == "EDS":
        service = cluster.pop("eds_cluster_config")["service_name"]
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = assignments[service]
    return cluster


def _unreachable_xds_cluster() -> dict:
    port = free_port()
    endpoint = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
    return {
        "name": "meshc-xds", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "meshc-xds",
                            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]},
    }
