"""Proxy scope: a proxy that names its service receives only what that service's `egress` calls.

The repo is compiled by the pipeline into a real rendered tree, served in-process.
Streams are driven request by request (SotW and Delta) to pin what a scoped
proxy receives and when; a real Envoy shows what that means for requests: a
scoped proxy reaches what its service calls, and nothing else.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import grpc
import pytest
import requests
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import struct_pb2

from compiler.load import Source
from compiler.pipeline import compile_source
from compiler.xds import sample, scope
from compiler.xds.server import Options, ServerThread
from compiler.xds.snapshot import TYPE_URLS, SnapshotError, load_snapshot, read_files, resource, type_snapshot
from support.backends import Backend, unique_loopback
from support.envoy import Envoy
from test_xds_protocol import Client, DeltaClient

ENV = "prod"
CDS, EDS, LDS, RDS = (TYPE_URLS[k] for k in ("clusters", "endpoints", "listeners", "routes"))


def _policy(name: str, port: int, **spec) -> dict:
    return {"apiVersion": "meshc.dev/v1", "kind": "TrafficPolicy", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "protocol": "HTTP"}], **spec}}


def _render(root, address: str, backends: dict[str, str], web_egress, other_timeout: str = "5s",
            other_egress=None) -> None:
    """web calls what `web_egress` says (other what `other_egress` does, if given); api and
    other share port 8080, db has 9090 alone."""
    other = _policy("other", 8080, timeout=other_timeout, **({"egress": other_egress} if other_egress else {}))
    policies = {"web": _policy("web", 8080, egress=web_egress), "api": _policy("api", 8080),
                "other": other, "db": _policy("db", 9090)}
    files = {f"policies/shop/{n}.yaml": yaml.safe_dump(p).encode() for n, p in policies.items()}
    files[f"environments/{ENV}.yaml"] = yaml.safe_dump({
        "apiVersion": "meshc.dev/v1", "kind": "Environment", "metadata": {"name": ENV},
        "spec": {"envoy": {"listenerAddress": address},
                 "endpoints": {f"shop/{n}": [a] for n, a in backends.items()}}}).encode()
    result = compile_source(Source(files), envs=[ENV])
    assert result.ok, [d.render() for d in result.diagnostics]
    staging = root.parent / f".{root.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    for path, data in result.outputs[ENV].items():
        (staging / ENV / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / ENV / path).write_bytes(data)
    if root.exists():
        shutil.rmtree(root / ENV)
    root.mkdir(exist_ok=True)
    (staging / ENV).rename(root / ENV)  # one rename: the server reads the new tree whole


ADDRESSES = {"web": "127.0.0.1:1", "api": "127.0.0.1:2", "other": "127.0.0.1:3", "db": "127.0.0.1:4"}
API = "outbound|8080||api.shop.svc.cluster.local"
OTHER = "outbound|8080||other.shop.svc.cluster.local"
DB = "outbound|9090||db.shop.svc.cluster.local"


@pytest.fixture
def served(tmp_path):
    rendered = tmp_path / "rendered"
    _render(rendered, "0.0.0.0", ADDRESSES, ["shop/api"])
    with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0, debounce=0.01)) as server:
        with grpc.insecure_channel(server.grpc_address) as channel:
            yield server, channel, rendered


def _node(service: str = "") -> dict:
    node = {"id": f"p-{service or 'all'}", "cluster": ENV}
    if service:
        node["metadata"] = struct_pb2.Struct(fields={"service": struct_pb2.Value(string_value=service)})
    return node


def _unpacked(response, cls) -> list:
    out = []
    for packed in response.resources:
        msg = cls()
        packed.Unpack(msg)
        out.append(msg)
    return out


def _names(response, cls) -> list[str]:
    return sorted(msg.name for msg in _unpacked(response, cls))


def _virtual_hosts(response) -> dict[str, list[str]]:
    return {msg.name: [h.name for h in msg.virtual_hosts] for msg in _unpacked(response, route_pb2.RouteConfiguration)}


def _wait_published(server, version_before: str) -> None:
    deadline = time.monotonic() + 5
    while server.call(lambda: server.server.hub.cache.get(ENV).snapshot.digest) == version_before:
        assert time.monotonic() < deadline, "the new files were not published"
        time.sleep(0.01)


def _digest(server) -> str:
    return server.call(lambda: server.server.hub.cache.get(ENV).snapshot.digest)


def test_a_scoped_proxy_receives_only_what_its_service_calls(served):
    server, channel, _ = served
    scoped, whole = Client(channel), Client(channel)
    for client, service in ((scoped, "shop/web"), (whole, "")):
        client.send(node=_node(service), type_url=CDS)
    assert _names(scoped.recv(), cluster_pb2.Cluster) == [API]
    assert _names(whole.recv(), cluster_pb2.Cluster) == sorted([API, OTHER, DB, "outbound|8080||web.shop.svc.cluster.local"])
    scoped.send(type_url=LDS)
    assert _names(scoped.recv(), listener_pb2.Listener) == ["0.0.0.0_8080"]  # not db's 9090
    scoped.send(type_url=RDS, resource_names=["8080"])
    assert _virtual_hosts(scoped.recv()) == {"8080": ["api.shop.svc.cluster.local:8080"]}
    whole.send(type_url=RDS, resource_names=["8080"])
    assert _virtual_hosts(whole.recv()) == {"8080": ["api.shop.svc.cluster.local:8080", "other.shop.svc.cluster.local:8080",
                                                     "web.shop.svc.cluster.local:8080"]}
    nobody = Client(channel)
    nobody.send(node=_node("shop/nobody"), type_url=CDS)      # a service the snapshot does not know
    assert len(_names(nobody.recv(), cluster_pb2.Cluster)) == 4
    proxies = requests.get(f"{server.http_url}/debug/proxies", timeout=5).json()
    assert {(p["service"], p["scoped"]) for p in proxies} == {("shop/web", True), ("", False), ("shop/nobody", False)}


def test_proxies_of_two_scoped_services_in_step_each_get_their_own(tmp_path):
    """Scoped kinds share one memo of whole responses per snapshot and kind: two services'
    proxies whose streams count alike (the same nonces) still get each their own scope."""
    rendered = tmp_path / "rendered"
    _render(rendered, "0.0.0.0", ADDRESSES, ["shop/api"], other_egress=["shop/db"])
    with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0)) as server:
        with grpc.insecure_channel(server.grpc_address) as channel:
            sotw_names = lambda response: _names(response, cluster_pb2.Cluster)  # noqa: E731
            delta_names = lambda response: sorted(r.name for r in response.resources)  # noqa: E731
            for client_class, names, extra in ((Client, sotw_names, {}),
                                               (DeltaClient, delta_names, {"resource_names_subscribe": ["*"]})):
                web, other = client_class(channel), client_class(channel)
                web.send(node=_node("shop/web"), type_url=CDS, **extra)
                other.send(node=_node("shop/other"), type_url=CDS, **extra)
                first_web, first_other = web.recv(), other.recv()
                assert first_web.nonce == first_other.nonce
                assert (names(first_web), names(first_other)) == ([API], [DB]), client_class


def test_a_scoped_rest_poll_is_cut_the_same_way(served):
    server, _, _ = served
    def poll(kind, **node):
        body = {"node": {"id": "rest-1", "cluster": ENV, **node}, "resource_names": ["8080"] if kind == "routes" else []}
        return requests.post(f"{server.http_url}/v3/discovery:{kind}", json=body, timeout=5).json()
    assert [c["name"] for c in poll("clusters", metadata={"service": "shop/web"})["resources"]] == [API]
    assert len(poll("clusters")["resources"]) == 4
    [config] = poll("routes", metadata={"service": "shop/web"})["resources"]
    assert [h["name"] for h in config["virtual_hosts"]] == ["api.shop.svc.cluster.local:8080"]


def test_a_service_without_egress_and_an_unknown_one_receive_the_whole_environment(served):
    _, channel, _ = served
    for service in ("shop/api", "shop/nobody"):
        client = Client(channel)
        client.send(node=_node(service), type_url=CDS)
        assert len(_names(client.recv(), cluster_pb2.Cluster)) == 4, service


def test_a_change_outside_the_scope_sends_a_scoped_proxy_nothing(served):
    """other's timeout changes its virtual host on 8080: the whole-environment proxy gets the
    route configuration again; the scoped one, whose 8080 holds api's only, hears nothing."""
    server, channel, rendered = served
    scoped, whole = Client(channel), Client(channel)
    for client, service in ((scoped, "shop/web"), (whole, "")):
        client.send(node=_node(service), type_url=RDS, resource_names=["8080"])
        first = client.recv()
        client.send(type_url=RDS, resource_names=["8080"], version_info=first.version_info, response_nonce=first.nonce)
    before = _digest(server)
    _render(rendered, "0.0.0.0", ADDRESSES, ["shop/api"], other_timeout="7s")
    _wait_published(server, before)
    assert whole.recv() is not None
    assert scoped.quiet()


def test_an_egress_change_moves_what_a_scoped_proxy_holds(served):
    """web now calls other instead of api: over Delta the proxy is sent other's cluster and
    told api's is gone; over SotW it is sent the new set whole."""
    server, channel, rendered = served
    delta, sotw = DeltaClient(channel), Client(channel)
    delta.send(node=_node("shop/web"), type_url=CDS, resource_names_subscribe=["*"])
    first = delta.recv()
    assert [r.name for r in first.resources] == [API]
    delta.send(type_url=CDS, response_nonce=first.nonce)
    sotw.send(node=_node("shop/web"), type_url=CDS)
    first_sotw = sotw.recv()
    sotw.send(type_url=CDS, version_info=first_sotw.version_info, response_nonce=first_sotw.nonce)
    before = _digest(server)
    _render(rendered, "0.0.0.0", ADDRESSES, ["shop/other"])
    _wait_published(server, before)
    pushed = delta.recv()
    assert ([r.name for r in pushed.resources], list(pushed.removed_resources)) == ([OTHER], [API])
    assert _names(sotw.recv(), cluster_pb2.Cluster) == [OTHER]


def test_scopes_json_is_checked_when_its_bytes_change_and_reused_when_they_do_not(tmp_path):
    """A reload whose scopes.json is the served one's bytes (or another environment's) takes
    the parsed file as it is; one whose bytes differ is read and checked again, so a hand
    edit after a good load is refused, not served."""
    rendered = tmp_path / "rendered"
    _render(rendered, "0.0.0.0", ADDRESSES, ["shop/api"])
    files = read_files(rendered / ENV / "envoy")
    first = scope.attach(load_snapshot(ENV, files), files[scope.FILE])
    again = scope.attach(load_snapshot(ENV, files, first), files[scope.FILE], first)
    assert again.scopes.services is first.scopes.services
    elsewhere = scope.attach(load_snapshot("staging", files), files[scope.FILE], None, [first])
    assert elsewhere.scopes.services is first.scopes.services     # another environment's, the same bytes
    assert [r.name for r in again.kind_for("shop/web", "clusters").resources.values()] == [API]
    edited = files[scope.FILE].replace(b'"shop/api"', b'"shop/db"', 1)
    assert edited != files[scope.FILE]
    with pytest.raises(SnapshotError, match="scopes.json: version_info .* is not the SHA-256"):
        scope.attach(load_snapshot(ENV, files, first), edited, first)
    with pytest.raises(SnapshotError, match="scopes.json: not JSON"):
        scope.attach(load_snapshot(ENV, files, first), files[scope.FILE][:-2], first)


def test_a_trimmed_route_configuration_is_the_bytes_protobuf_would_write():
    """A scoped route configuration is spliced: its virtual hosts' bytes between the fields
    numbered before and after them. The result must be the deterministic serialisation of
    the configuration with those virtual hosts alone, fields on both sides included."""
    hosts = [route_components_pb2.VirtualHost(name=f"h{i}", domains=[f"h{i}.example"]) for i in range(3)]
    whole = route_pb2.RouteConfiguration(name="8080", virtual_hosts=hosts, response_headers_to_remove=["server"])
    whole.validate_clusters.value = True
    config = replace(resource("8080", whole), source=b"whole", parts=tuple(
        (f"h{i}".encode(), h.SerializeToString(deterministic=True)) for i, h in enumerate(hosts)))
    callee = lambda host: {"clusters": [], "endpoints": [], "listeners": [], "routes": {"8080": [host]}}  # noqa: E731
    scopes = scope.Scopes({"a/x": ("a/y", "a/z")}, {"a/y": callee("h0"), "a/z": callee("h2")})
    [trimmed] = scopes.kind("a/x", "routes", type_snapshot("routes", RDS, "v1", {"8080": config})).resources.values()
    expected = route_pb2.RouteConfiguration()
    expected.CopyFrom(whole)
    del expected.virtual_hosts[1]
    assert trimmed.version == resource("8080", expected).version
    assert [h["name"] for h in trimmed.json["virtual_hosts"]] == ["h0", "h2"]
    assert trimmed.json["validate_clusters"] is True


def test_a_scoped_envoy_reaches_what_its_service_calls_and_nothing_else(tmp_path):
    backends = {n: Backend(n).start() for n in ("web", "api", "other", "db")}
    address = unique_loopback()
    rendered = tmp_path / "rendered"
    try:
        _render(rendered, address, {n: b.address for n, b in backends.items()}, ["shop/api", "shop/db"])
        with ServerThread(Options(rendered=rendered, grpc_port=0, http_port=0, debounce=0.01)) as server:
            port = ("127.0.0.1", server.server.grpc_port)
            with Envoy(sample.ads_bootstrap("web-1", ENV, port, service="shop/web"), tmp_path / "scoped") as proxy:
                proxy.wait_until(lambda: f"{address}_9090" in str(proxy.listeners()), timeout=10,
                                 message="the scoped proxy has its listeners")
                listener = proxy.listener_address(f"{address}_8080")
                get = lambda host: requests.get(f"http://{listener}/", headers={"host": host}, timeout=10)  # noqa: E731
                assert (get("api.shop").status_code, get("api.shop").text) == (200, "api")
                assert get("other.shop").status_code == 404  # no route: other is not in web's egress
                assert get("web.shop").status_code == 404
                assert len(proxy.clusters()["cluster_statuses"]) - 1 == 2  # api and db, beside xds_cluster
                db = proxy.listener_address(f"{address}_9090")
                assert requests.get(f"http://{db}/", headers={"host": "db.shop"}, timeout=10).text == "db"
    finally:
        for backend in backends.values():
            backend.stop()
