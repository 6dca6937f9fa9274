"""The Envoy target, resource by resource: names, mappings, diagnostics, strict parsing."""

from __future__ import annotations

import hashlib
import importlib
import json

from dataclasses import replace

import orjson
import pytest
from google.protobuf import any_pb2, json_format, symbol_database

from compiler.diagnostics import Severity, Span, SpanMap
from compiler import cache
from compiler.emit import file_bytes, plain
from compiler.load import source_from_dir
from compiler.model import (ConnectionPool, ConsistentHash, HashOn, Ingress, LoadBalancer, MatchKind, Mesh,
                            OutlierDetection, Protocol, Retries, SimpleLb, Tls, TlsMode, Traffic)
from compiler.pipeline import compile_source
from compiler.targets import envoy
from compiler.targets.envoy.common import duration
from compiler.xds.resources import content_version
from conftest import REPO
from envoy_meshes import canary, http, kitchen_sink, mesh, service, split, stable

# Extension modules whose Any-typed configs appear in the output: importing
# them registers their messages in the default pool, so ParseDict resolves them.
_EXTENSIONS = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.http.router.v3.router_pb2",
    "envoy.extensions.filters.http.fault.v3.fault_pb2",
    "envoy.extensions.filters.http.cors.v3.cors_pb2",
    "envoy.extensions.transport_sockets.tls.v3.tls_pb2",
    "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
    "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
)
_RESOURCE_MODULES = {
    "envoy.config.cluster.v3.Cluster": "envoy.config.cluster.v3.cluster_pb2",
    "envoy.config.endpoint.v3.ClusterLoadAssignment": "envoy.config.endpoint.v3.endpoint_pb2",
    "envoy.config.listener.v3.Listener": "envoy.config.listener.v3.listener_pb2",
    "envoy.config.route.v3.RouteConfiguration": "envoy.config.route.v3.route_pb2",
}
for _module in _EXTENSIONS:
    importlib.import_module(_module)

KINDS = ("clusters", "endpoints", "listeners", "routes")
FQDN = "reviews.bookinfo.svc.cluster.local"


def lower(*services, address="0.0.0.0"):
    return envoy.lower(mesh(*services, address=address))


def files(lowered) -> dict[str, dict]:
    return {f.path.removeprefix("envoy/").removesuffix(".json"): json.loads(file_bytes(f)) for f in lowered.files}


def by_name(lowered, kind: str) -> dict[str, dict]:
    key = "cluster_name" if kind == "endpoints" else "name"
    return {r[key]: r for r in files(lowered)[kind]["resources"]}


def codes(lowered) -> list[tuple[str, Severity]]:
    return [(d.code, d.severity) for d in lowered.diagnostics]


def parse_strict(resource: dict):
    """ParseDict into the resource's own message type; unknown fields refused."""
    full_name = resource["@type"].removeprefix("type.googleapis.com/")
    module = importlib.import_module(_RESOURCE_MODULES[full_name])
    message = getattr(module, full_name.rsplit(".", 1)[1])()
    body = {k: v for k, v in resource.items() if k != "@type"}
    return json_format.ParseDict(body, message, ignore_unknown_fields=False)


def deprecated_fields(message, path: str = "") -> list[str]:
    """Paths of every deprecated field set anywhere in `message`, through Any payloads too."""
    found = []
    for field, value in message.ListFields():
        here = f"{path}.{field.name}" if path else field.name
        if field.GetOptions().deprecated:
            found.append(here)
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = [v for v in value.values()] if field.message_type.fields_by_name["value"].message_type else []
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, any_pb2.Any):
                name = item.type_url.rsplit("/", 1)[1]
                item = _unpack(item, name)
            found += deprecated_fields(item, here)
    return found


def _unpack(packed, name: str):
    message = symbol_database.Default().GetSymbol(name)()
    packed.Unpack(message)
    return message


def default_route(lowered, port=9080, host=f"{FQDN}:9080", config=None) -> dict:
    vhosts = {v["name"]: v for v in by_name(lowered, "routes")[config or str(port)]["virtual_hosts"]}
    return vhosts[host]["routes"][-1]["route"]


# --- files ----------------------------------------------------------------------------------


def test_four_discovery_responses_with_content_hash_versions():
    lowered = envoy.lower(kitchen_sink())
    assert [f.path for f in lowered.files] == [f"envoy/{k}.json" for k in KINDS]
    assert {f.format for f in lowered.files} == {"json"}
    urls = {"clusters": "envoy.config.cluster.v3.Cluster",
            "endpoints": "envoy.config.endpoint.v3.ClusterLoadAssignment",
            "listeners": "envoy.config.listener.v3.Listener",
            "routes": "envoy.config.route.v3.RouteConfiguration"}
    for kind, content in files(lowered).items():
        resources = content["resources"]
        assert set(content) == {"version_info", "type_url", "resources"}
        assert content["type_url"] == f"type.googleapis.com/{urls[kind]}"
        assert {r["@type"] for r in resources} == {content["type_url"]}
        rest = json.dumps({"resources": resources, "type_url": content["type_url"]}, indent=2, sort_keys=True, ensure_ascii=False)
        assert content["version_info"] == hashlib.sha256(rest.encode() + b"\n").hexdigest()
        names = [r["cluster_name" if kind == "endpoints" else "name"] for r in resources]
        assert len(set(names)) == len(names)
        if kind in ("listeners", "routes"):
            assert names == sorted(names)
        else:  # by service in mesh order, then by name
            order = [(_service_of(n), n) for n in names]
            assert order == sorted(order), kind


def _service_of(cluster: str) -> tuple[str, str]:
    """`outbound|PORT|SUBSET|NAME.NAMESPACE.svc.DOMAIN` → (namespace, name): the mesh's order."""
    name, namespace = cluster.split("|")[3].split(".")[:2]
    return namespace, name


def test_output_is_byte_identical_across_runs():
    def render():
        return [file_bytes(f)
                for f in envoy.lower(kitchen_sink()).files]
    assert render() == render()


def test_version_changes_only_for_the_type_that_changed():
    before = files(lower(service(timeout_ms=1000)))
    after = files(lower(service(timeout_ms=2000)))
    changed = {k for k in KINDS if before[k]["version_info"] != after[k]["version_info"]}
    assert changed == {"routes"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_resource_parses_strictly(kind):
    resources = files(envoy.lower(kitchen_sink()))[kind]["resources"]
    assert resources
    for resource in resources:
        assert deprecated_fields(parse_strict(resource)) == [], resource.get("name")


def test_strict_parsing_refuses_an_unknown_field():
    cluster = next(iter(by_name(lower(service()), "clusters").values()))
    with pytest.raises(json_format.ParseError):
        parse_strict({**cluster, "no_such_field": 1})


@pytest.mark.parametrize("ms, text", [(0, "0s"), (250, "0.250s"), (1500, "1.500s"), (4000, "4s"),
                                      (90_000, "90s"), (5, "0.005s")])
def test_durations_are_protobuf_json(ms, text):
    assert duration(ms) == text


# --- clusters and endpoints -------------------------------------------------------------------


def test_cluster_per_version_and_whole_service_for_http_and_tcp_ports():
    reviews = service(ports=(http(9080), http(3306, Protocol.TCP, "tcp")), versions=("v1", "v2"),
                      endpoints={"v1": ["10.0.0.1:9080"], "v2": ["10.0.0.2:9080"]})
    assert sorted(by_name(lower(reviews), "clusters")) == sorted(
        f"outbound|{port}|{v}|{FQDN}" for port in (9080, 3306) for v in ("", "v1", "v2"))


def test_eds_clusters_get_their_addresses_over_ads():
    reviews = service(versions=("v1", "v2"),
                      endpoints={"v1": ["10.0.0.1:9080", "10.0.0.3:9081"], "v2": ["10.0.0.2:9080", "10.0.0.1:9080"]})
    lowered = lower(reviews)
    cluster = by_name(lowered, "clusters")[f"outbound|9080|v1|{FQDN}"]
    assert cluster["type"] == "EDS"
    assert cluster["eds_cluster_config"] == {"eds_config": {"ads": {}, "resource_api_version": "V3"},
                                             "service_name": f"outbound|9080|v1|{FQDN}"}
    assert "load_assignment" not in cluster

    def addresses(name):
        assignment = by_name(lowered, "endpoints")[name]
        return [(e["endpoint"]["address"]["socket_address"]["address"],
                 e["endpoint"]["address"]["socket_address"]["port_value"])
                for group in assignment["endpoints"] for e in group["lb_endpoints"]]

    assert addresses(f"outbound|9080|v1|{FQDN}") == [("10.0.0.1", 9080), ("10.0.0.3", 9081)]
    # the whole service: every address once, in the environment's order
    assert addresses(f"outbound|9080||{FQDN}") == [("10.0.0.1", 9080), ("10.0.0.3", 9081), ("10.0.0.2", 9080)]


def test_a_version_without_addresses_still_has_an_assignment():
    lowered = lower(service(versions=("v1", "v2"), endpoints={"v1": ["10.0.0.1:9080"]}))
    assert by_name(lowered, "endpoints")[f"outbound|9080|v2|{FQDN}"] == {
        "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": f"outbound|9080|v2|{FQDN}"}


def test_dns_names_make_strict_dns_clusters_with_inline_endpoints():
    lowered = lower(service(versions=("v1", "v2"),
                            endpoints={"v1": ["reviews-v1.internal:8080"], "v2": ["10.0.0.2:9080"]}))
    clusters, assignments = by_name(lowered, "clusters"), by_name(lowered, "endpoints")
    for name in (f"outbound|9080|v1|{FQDN}", f"outbound|9080||{FQDN}"):
        assert clusters[name]["type"] == "STRICT_DNS"
        assert "eds_cluster_config" not in clusters[name]
        assert clusters[name]["load_assignment"]["cluster_name"] == name
        assert name not in assignments
    socket = clusters[f"outbound|9080|v1|{FQDN}"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert socket["endpoint"]["address"]["socket_address"] == {"address": "reviews-v1.internal", "port_value": 8080}
    assert clusters[f"outbound|9080|v2|{FQDN}"]["type"] == "EDS"


@pytest.mark.parametrize("lb, policy", [
    (None, "LEAST_REQUEST"),
    (LoadBalancer(simple=SimpleLb.LEAST_REQUEST), "LEAST_REQUEST"),
    (LoadBalancer(simple=SimpleLb.ROUND_ROBIN), "ROUND_ROBIN"),
    (LoadBalancer(simple=SimpleLb.RANDOM), "RANDOM"),
    (LoadBalancer(consistent_hash=ConsistentHash(HashOn.SOURCE_IP)), "RING_HASH"),
])
def test_lb_policy(lb, policy):
    cluster = by_name(lower(service(load_balancer=lb)), "clusters")[f"outbound|9080||{FQDN}"]
    assert cluster["lb_policy"] == policy
    assert ("ring_hash_lb_config" in cluster) == (policy == "RING_HASH")


def test_passthrough_is_reported_not_dropped():
    lowered = lower(service(load_balancer=LoadBalancer(simple=SimpleLb.PASSTHROUGH)))
    assert codes(lowered) == [("envoy.passthrough-unsupported", Severity.WARNING)]
    assert "bookinfo/reviews" in lowered.diagnostics[0].message
    assert by_name(lowered, "clusters")[f"outbound|9080||{FQDN}"]["lb_policy"] == "LEAST_REQUEST"


@pytest.mark.parametrize("hashing, expected", [
    (ConsistentHash(HashOn.HEADER, header="x-user"), {"header": {"header_name": "x-user"}}),
    (ConsistentHash(HashOn.COOKIE, cookie="session", cookie_ttl_ms=90_000),
     {"cookie": {"name": "session", "ttl": "90s"}}),
    (ConsistentHash(HashOn.COOKIE, cookie="session"), {"cookie": {"name": "session"}}),
    (ConsistentHash(HashOn.SOURCE_IP), {"connection_properties": {"source_ip": True}}),
])
def test_consistent_hash_puts_the_hash_policy_on_the_route(hashing, expected):
    route = default_route(lower(service(load_balancer=LoadBalancer(consistent_hash=hashing))))
    assert route["hash_policy"] == [expected]
    # retries stay on the hashed host (istiod's DefaultConsistentHashPolicy)
    assert "retry_host_predicate" not in route["retry_policy"]


def test_connection_pool_defaults_are_istiods():
    cluster = by_name(lower(service()), "clusters")[f"outbound|9080||{FQDN}"]
    assert cluster["connect_timeout"] == "10s"
    assert cluster["circuit_breakers"] == {"thresholds": [{
        "max_connections": 4294967295, "max_pending_requests": 4294967295,
        "max_requests": 4294967295, "max_retries": 4294967295, "track_remaining": True}]}
    assert "typed_extension_protocol_options" not in cluster


def test_connection_pool_maps_to_thresholds_timeout_and_protocol_options():
    pool = ConnectionPool(max_connections=100, connect_timeout_ms=30, http1_max_pending_requests=64,
                          http2_max_requests=1000, max_requests_per_connection=10, max_retries=3)
    cluster = by_name(lower(service(connection_pool=pool)), "clusters")[f"outbound|9080||{FQDN}"]
    assert cluster["connect_timeout"] == "0.030s"
    assert cluster["circuit_breakers"]["thresholds"] == [{
        "max_connections": 100, "max_pending_requests": 64, "max_requests": 1000, "max_retries": 3,
        "track_remaining": True}]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options == {"@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                       "explicit_http_config": {"http_protocol_options": {}},
                       "common_http_protocol_options": {"max_requests_per_connection": 10}}


@pytest.mark.parametrize("protocol", [Protocol.HTTP2, Protocol.GRPC])
def test_http2_ports_speak_h2_upstream(protocol):
    lowered = lower(service(ports=(http(9080, protocol),)))
    options = by_name(lowered, "clusters")[f"outbound|9080||{FQDN}"]["typed_extension_protocol_options"]
    assert options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"] == {
        "http2_protocol_options": {}}


def test_tcp_clusters_have_no_http_options():
    pool = ConnectionPool(max_requests_per_connection=10)
    cluster = by_name(lower(service(ports=(http(3306, Protocol.TCP, "tcp"),), connection_pool=pool)),
                      "clusters")[f"outbound|3306||{FQDN}"]
    assert "typed_extension_protocol_options" not in cluster


def test_outlier_detection():
    lowered = lower(service(outlier_detection=OutlierDetection(7, 300_000, 900_000, 50)))
    cluster = by_name(lowered, "clusters")[f"outbound|9080||{FQDN}"]
    assert cluster["outlier_detection"] == {
        "consecutive_5xx": 7, "enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0,
        "interval": "300s", "base_ejection_time": "900s", "max_ejection_percent": 50}
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}


# --- TLS ------------------------------------------------------------------------------------

def _tls_context(lowered, version=""):
    socket = by_name(lowered, "clusters")[f"outbound|9080|{version}|{FQDN}"]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert socket["typed_config"]["@type"] == \
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return socket["typed_config"]


_SDS = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "1s"}  # a secret the server lacks holds a SotW proxy back 1 s


def test_istio_mutual_uses_the_workload_certificate_and_root_by_sds():
    lowered = lower(service(versions=("v1",), tls=Tls(TlsMode.ISTIO_MUTUAL)))
    context = _tls_context(lowered, "v1")
    assert context["sni"] == f"outbound_.9080_.v1_.{FQDN}"
    common = context["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"] == [{"name": "default", "sds_config": _SDS}]
    assert common["combined_validation_context"] == {
        "default_validation_context": {},
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": _SDS}}
    assert common["alpn_protocols"] == ["istio-peer-exchange", "istio"]


def test_mutual_with_credential_name_uses_kubernetes_secrets():
    tls = Tls(TlsMode.MUTUAL, credential_name="client", sni="reviews.example.com",
              subject_alt_names=("reviews.example.com",))
    context = _tls_context(lower(service(tls=tls)))
    assert context["sni"] == "reviews.example.com"
    common = context["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"] == [{"name": "kubernetes://client", "sds_config": _SDS}]
    assert common["combined_validation_context"] == {
        "default_validation_context": {"match_typed_subject_alt_names": [
            {"san_type": "DNS", "matcher": {"exact": "reviews.example.com"}}]},
        "validation_context_sds_secret_config": {"name": "kubernetes://client-cacert", "sds_config": _SDS}}


def test_simple_with_credential_name_only_verifies_the_server():
    lowered = lower(service(tls=Tls(TlsMode.SIMPLE, credential_name="ca")))
    common = _tls_context(lowered)["common_tls_context"]
    assert "tls_certificate_sds_secret_configs" not in common
    assert common["combined_validation_context"]["validation_context_sds_secret_config"]["name"] == \
        "kubernetes://ca-cacert"
    options = by_name(lowered, "clusters")[f"outbound|9080||{FQDN}"]["typed_extension_protocol_options"]
    upstream = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["upstream_http_protocol_options"]
    assert upstream == {"auto_sni": True, "auto_san_validation": True}


def test_simple_without_credential_trusts_the_system_roots():
    common = _tls_context(lower(service(tls=Tls(TlsMode.SIMPLE))))["common_tls_context"]
    assert common["validation_context"] == {"trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}


def test_disable_means_no_transport_socket():
    cluster = by_name(lower(service(tls=Tls(TlsMode.DISABLE))), "clusters")[f"outbound|9080||{FQDN}"]
    assert "transport_socket" not in cluster


def test_mutual_without_credential_name_is_an_error():
    lowered = lower(service(tls=Tls(TlsMode.MUTUAL)))
    assert codes(lowered) == [("envoy.tls-mutual-without-credential", Severity.ERROR)]


# --- listeners --------------------------------------------------------------------------------

def test_one_listener_per_distinct_http_port():
    lowered = lower(service(ports=(http(9080), http(9443, Protocol.HTTP2, "h2"))),
                    service("ratings", ports=(http(9080),)), address="127.0.0.1")
    listeners = by_name(lowered, "listeners")
    assert sorted(listeners) == ["127.0.0.1_9080", "127.0.0.1_9443"]
    listener = listeners["127.0.0.1_9080"]
    assert listener["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9080}}
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    config = hcm["typed_config"]
    assert config["stat_prefix"] == "outbound_127.0.0.1_9080"
    assert config["rds"] == {"route_config_name": "9080",
                             "config_source": {"ads": {}, "resource_api_version": "V3"}}
    # istiod's order: fault and CORS (configured per route) before the router, which must be last.
    assert [f["name"] for f in config["http_filters"]] == [
        "envoy.filters.http.fault", "envoy.filters.http.cors", "envoy.filters.http.router"]
    assert config["http_filters"][-1]["typed_config"] == {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}


def test_a_tcp_port_proxies_to_its_service():
    mysql = service("mysql", "db", ports=(http(3306, Protocol.TCP, "tcp"),), versions=("v1", "v2"),
                    traffic=canary("v1", "v2", 25))
    listener = by_name(lower(mysql), "listeners")["0.0.0.0_3306"]
    proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert proxy["weighted_clusters"] == {"clusters": [
        {"name": "outbound|3306|v1|mysql.db.svc.cluster.local", "weight": 75},
        {"name": "outbound|3306|v2|mysql.db.svc.cluster.local", "weight": 25}]}


def test_a_tcp_port_hashes_on_the_source_ip():
    mysql = service("mysql", "db", ports=(http(3306, Protocol.TCP, "tcp"),),
                    load_balancer=LoadBalancer(consistent_hash=ConsistentHash(HashOn.SOURCE_IP)))
    listener = by_name(lower(mysql), "listeners")["0.0.0.0_3306"]
    proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert proxy["cluster"] == "outbound|3306||mysql.db.svc.cluster.local"
    assert proxy["hash_policy"] == [{"source_ip": {}}]


# --- routes ---------------------------------------------------------------------------------

def test_virtual_host_per_service_with_every_name_it_answers_to():
    lowered = lower(service(), service("ratings"))
    config = by_name(lowered, "routes")["9080"]
    assert [v["name"] for v in config["virtual_hosts"]] == [
        "ratings.bookinfo.svc.cluster.local:9080", f"{FQDN}:9080"]
    names = [FQDN, "reviews", "reviews.bookinfo", "reviews.bookinfo.svc"]
    assert config["virtual_hosts"][1]["domains"] == sorted(names + [f"{n}:9080" for n in names])


def test_a_short_name_two_namespaces_share_is_left_out_and_reported():
    lowered = lower(service("reviews", "a"), service("reviews", "b"))
    for vhost in by_name(lowered, "routes")["9080"]["virtual_hosts"]:
        assert "reviews" not in vhost["domains"] and "reviews:9080" not in vhost["domains"]
        assert any(d.startswith("reviews.a") or d.startswith("reviews.b") for d in vhost["domains"])
    assert codes(lowered) == [("envoy.ambiguous-short-name", Severity.WARNING)] * 2


def test_canary_header_route_first_then_weighted_default():
    traffic = canary("v1", "v2", 10, {"x-canary": (MatchKind.EXACT, "on"), "x-user": (MatchKind.REGEX, "qa-.*")})
    lowered = lower(service(versions=("v1", "v2"), traffic=traffic))
    [vhost] = by_name(lowered, "routes")["9080"]["virtual_hosts"]
    match, default = vhost["routes"]
    assert match["match"] == {"prefix": "/", "headers": [
        {"name": "x-canary", "string_match": {"exact": "on"}},
        {"name": "x-user", "string_match": {"safe_regex": {"regex": "qa-.*"}}}]}
    assert match["route"]["cluster"] == f"outbound|9080|v2|{FQDN}"
    assert default["match"] == {"prefix": "/"}
    assert default["route"]["weighted_clusters"] == {"clusters": [
        {"name": f"outbound|9080|v1|{FQDN}", "weight": 90},
        {"name": f"outbound|9080|v2|{FQDN}", "weight": 10}]}


@pytest.mark.parametrize("traffic, expected", [
    (Traffic(), {"cluster": f"outbound|9080||{FQDN}"}),
    (stable("v1"), {"cluster": f"outbound|9080|v1|{FQDN}"}),
    (canary("v1", "v2", 0), {"cluster": f"outbound|9080|v1|{FQDN}"}),
    (canary("v1", "v2", 100), {"cluster": f"outbound|9080|v2|{FQDN}"}),
    (split(v1=80, v2=0, v3=20), {"weighted_clusters": {"clusters": [
        {"name": f"outbound|9080|v1|{FQDN}", "weight": 80},
        {"name": f"outbound|9080|v3|{FQDN}", "weight": 20}]}}),
])
def test_default_route_destination(traffic, expected):
    route = default_route(lower(service(versions=("v1", "v2", "v3"), traffic=traffic)))
    assert {k: v for k, v in route.items() if k in ("cluster", "weighted_clusters")} == expected


@pytest.mark.parametrize("timeout_ms, expected", [(None, "0s"), (250, "0.250s"), (4000, "4s")])
def test_route_timeout_never_envoys_default(timeout_ms, expected):
    assert default_route(lower(service(timeout_ms=timeout_ms)))["timeout"] == expected


_PREVIOUS_HOSTS = [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]


@pytest.mark.parametrize("retries, expected", [
    # istiod ≥ 1.24 (EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY=true): no status code is retried by default
    (None, {"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            "num_retries": 2}),
    (Retries(3, 1000, ("5xx", "connect-failure")), {"retry_on": "5xx,connect-failure", "num_retries": 3,
                                                    "per_try_timeout": "1s"}),
    (Retries(2, None, ("gateway-error", "503")), {"retry_on": "gateway-error,retriable-status-codes",
                                                  "num_retries": 2, "retriable_status_codes": [503]}),
    (Retries(0), None),
])
def test_retry_policy_as_istiod_converts_it(retries, expected):
    route = default_route(lower(service(retries=retries)))
    if expected is None:
        assert "retry_policy" not in route
    else:
        assert route["retry_policy"] == {**expected, "host_selection_retry_max_attempts": "5",
                                         "retry_host_predicate": _PREVIOUS_HOSTS}


# --- ingress --------------------------------------------------------------------------------

def test_ingress_gets_a_gateway_listener_and_route_configuration():
    reviews = service(versions=("v1", "v2"), traffic=canary("v1", "v2", 10, {"x-canary": (MatchKind.EXACT, "on")}),
                      ingress=Ingress(("reviews.example.com",), 80), timeout_ms=500)
    ratings = service("ratings", ports=(http(9090),), ingress=Ingress(("ratings.example.com", "*"), 80))
    lowered = lower(reviews, ratings, address="127.0.0.1")
    listener = by_name(lowered, "listeners")["127.0.0.1_80"]
    config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert config["rds"]["route_config_name"] == "http.80"
    gateway = by_name(lowered, "routes")["http.80"]
    vhosts = {v["name"]: v for v in gateway["virtual_hosts"]}
    assert sorted(vhosts) == ["*:80", "ratings.example.com:80", "reviews.example.com:80"]
    assert vhosts["reviews.example.com:80"]["domains"] == ["reviews.example.com", "reviews.example.com:80"]
    assert vhosts["*:80"]["domains"] == ["*"]
    # routed like the service's own routes
    sidecar = by_name(lowered, "routes")["9080"]["virtual_hosts"][0]["routes"]
    assert vhosts["reviews.example.com:80"]["routes"] == sidecar
    assert vhosts["ratings.example.com:80"]["routes"][-1]["route"]["cluster"] == \
        "outbound|9090||ratings.bookinfo.svc.cluster.local"


def test_ingress_port_that_is_also_a_service_port_is_reported():
    lowered = lower(service(ingress=Ingress(("x.example.com",), 9080)))
    assert codes(lowered) == [("envoy.ingress-port-conflict", Severity.WARNING)]
    assert sorted(by_name(lowered, "listeners")) == ["0.0.0.0_9080"]


# --- consistency ----------------------------------------------------------------------------

def test_the_kitchen_sink_is_consistent_and_quiet():
    lowered = envoy.lower(kitchen_sink())
    assert lowered.diagnostics == ()


def test_an_inconsistent_snapshot_is_a_compiler_bug(monkeypatch):
    from compiler.targets.envoy import endpoints
    monkeypatch.setattr(endpoints, "lower", lambda mesh: [])
    with pytest.raises(envoy.InconsistentSnapshot) as error:
        lower(service())
    assert any("has no ClusterLoadAssignment" in p for p in error.value.problems)


# --- per-service fragments and assemble -------------------------------------------------------
#
# The pipeline lowers each service on its own (in worker processes, or not at
# all when its cache holds the fragment as JSON) and assembles an environment
# from the fragments alone. These tests hold that to `lower`, byte for byte.

def _conflicts() -> Mesh:
    """Every diagnostic the target raises between services at once, with spans, so diagnostics
    cross the JSON round trip too. (Clashes `check.claims` refuses are not the target's.)"""
    def spanned(name, namespace="bookinfo", line=1, **fields):
        spans = SpanMap({(): Span(f"policies/{name}.yaml", line, 1),
                         ("ports",): Span(f"policies/{name}.yaml", line + 1, 3),
                         ("ingress",): Span(f"policies/{name}.yaml", line + 2, 3),
                         ("ingress", "port"): Span(f"policies/{name}.yaml", line + 2, 9),
                         ("ingress", "hosts"): Span(f"policies/{name}.yaml", line + 3, 9)})
        return replace(service(name, namespace, **fields), spans=spans)

    return mesh(
        spanned("reviews", "a", ingress=Ingress(("x.example.com", "*"), 80)),
        spanned("reviews", "b", ingress=Ingress(("y.example.com",), 80)),
        spanned("db1", ports=(http(3306, Protocol.TCP, "tcp"),)),
        spanned("web", ports=(http(81),), load_balancer=LoadBalancer(simple=SimpleLb.PASSTHROUGH),
                tls=Tls(TlsMode.MUTUAL), ingress=Ingress(("web.example.com",), 3306)),
    )


def _example_meshes() -> dict[str, Mesh]:
    result = compile_source(source_from_dir(REPO), jobs=1)
    assert result.ok, [d.render() for d in result.diagnostics]
    return {f"example-{env}": mesh for env, mesh in result.meshes.items()}


def _test_meshes() -> dict[str, Mesh]:
    return {"kitchen-sink": kitchen_sink(), "kitchen-sink-loopback": kitchen_sink("127.0.0.1"),
            "conflicts": _conflicts()}


def _rendered(lowered) -> tuple:
    """What a lowering amounts to: each file's bytes as emitted, and the diagnostics in order."""
    return [(f.path, f.format, file_bytes(f)) for f in lowered.files], lowered.diagnostics


def _through_cache(fragment):
    """A fragment as a re-compile gets it back: a record (JSON bytes) and its pieces, unpacked."""
    record, pieces = cache.pack_record(fragment)
    return cache.unpack(orjson.loads(record), dict(pieces))


def _assert_plain_json(value, where="fragment"):
    """Only dict (str keys), list, str, int, float, bool and None, exactly: no tuples, enums, dataclasses."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            assert type(key) is str, f"{where}: key {key!r}"
            _assert_plain_json(item, f"{where}.{key}")
    elif kind is list:
        for i, item in enumerate(value):
            _assert_plain_json(item, f"{where}[{i}]")
    else:
        assert kind in (str, int, float, bool, type(None)), f"{where}: {kind.__name__} {value!r}"


@pytest.mark.parametrize("name", sorted(_test_meshes()))
def test_assemble_from_json_fragments_equals_lower_for_the_test_meshes(name):
    lowered_mesh = _test_meshes()[name]
    fragments = [envoy.lower_service(s, lowered_mesh.environment) for s in lowered_mesh.services]
    cached = [_through_cache(f) for f in fragments]
    assert cached == fragments
    assert _rendered(envoy.assemble(lowered_mesh.environment, cached)) == _rendered(envoy.lower(lowered_mesh))


def test_assemble_from_json_fragments_equals_lower_for_every_example_environment():
    meshes = _example_meshes()
    assert sorted(meshes) == ["example-dev", "example-prod", "example-staging"]
    for name, example in meshes.items():
        cached = [_through_cache(envoy.lower_service(s, example.environment)) for s in example.services]
        assert _rendered(envoy.assemble(example.environment, cached)) == _rendered(envoy.lower(example)), name


def test_the_pipeline_emits_what_lower_does():
    result = compile_source(source_from_dir(REPO), jobs=1)
    for env, example in result.meshes.items():
        for f in envoy.lower(example).files:
            assert result.outputs[env][f.path] == file_bytes(f), (env, f.path)


@pytest.mark.parametrize("name", sorted(_test_meshes()) + ["example"])
def test_fragments_are_plain_json(name):
    meshes = _example_meshes() if name == "example" else {name: _test_meshes()[name]}
    for each in meshes.values():
        for svc in each.services:
            record, _ = cache._pack(envoy.lower_service(svc, each.environment))  # before orjson, which takes tuples
            orjson.dumps(record)  # no `default`: anything orjson cannot write natively fails here
            _assert_plain_json(record)


def test_cross_service_diagnostics_keep_their_spans_through_json():
    conflicts = _conflicts()
    cached = [_through_cache(envoy.lower_service(s, conflicts.environment)) for s in conflicts.services]
    diagnostics = envoy.assemble(conflicts.environment, cached).diagnostics
    assert sorted({d.code for d in diagnostics}) == [
        "envoy.ambiguous-short-name", "envoy.ingress-port-conflict", "envoy.passthrough-unsupported",
        "envoy.tls-mutual-without-credential"]
    assert all(isinstance(d.span, Span) for d in diagnostics)
    port_conflict = next(d for d in diagnostics if d.code == "envoy.ingress-port-conflict")
    assert port_conflict.span == Span("policies/web.yaml", 3, 9)
    assert port_conflict.message.startswith("bookinfo/web: ingress port 3306 is also a service port")


def test_diagnostics_without_spans_survive_json_as_none():
    lone = mesh(service(tls=Tls(TlsMode.MUTUAL)))
    cached = [_through_cache(envoy.lower_service(s, lone.environment)) for s in lone.services]
    [diagnostic] = envoy.assemble(lone.environment, cached).diagnostics
    assert (diagnostic.code, diagnostic.span) == ("envoy.tls-mutual-without-credential", None)


def test_version_hashes_the_rest_of_the_file_even_beyond_ascii():
    odd = service(versions=("v1", "v2"),
                  traffic=canary("v1", "v2", 10, {"x-canary": (MatchKind.EXACT, "é\x7f☃\\\"")}))
    for content in files(lower(odd)).values():
        rest = {"resources": content["resources"], "type_url": content["type_url"]}
        indented = (json.dumps(rest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        assert content["version_info"] == hashlib.sha256(indented).hexdigest() == content_version(**rest)


def test_assemble_leaves_its_fragments_alone():
    # The pipeline may hold fragments in memory across compiles; assemble shares values with them.
    conflicts = _conflicts()
    fragments = [envoy.lower_service(s, conflicts.environment) for s in conflicts.services]
    before = orjson.dumps(plain(fragments))
    envoy.assemble(conflicts.environment, fragments)
    envoy.assemble(conflicts.environment, fragments)
    assert orjson.dumps(plain(fragments)) == before


def test_an_inconsistent_snapshot_reaches_the_parent_whole():
    """Raised in a worker process, it is pickled to the parent."""
    import pickle

    from compiler.targets.envoy import InconsistentSnapshot

    again = pickle.loads(pickle.dumps(InconsistentSnapshot("prod", ["route 'x' names no cluster"])))
    assert again.environment == "prod" and again.problems == ("route 'x' names no cluster",)
    assert "inconsistent" in str(again)
