"""Snapshot loading: the strict parse, the consistency check, and what a reload publishes."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import requests

from compiler.emit import write_rendered
from compiler.load import source_from_dir
from compiler.pipeline import compile_source
from compiler.xds import consistency_errors, sample
from compiler.xds.server import Options, ServerThread
from compiler.xds.rest import RestView, rest_config_source
from compiler.xds.snapshot import (NAMED_BODIES_LIMIT, SnapshotError, environment_dirs,
                                   load_snapshot, read_files)

ENV = "demo"
V1, V2 = sample.cluster_name("v1"), sample.cluster_name("v2")
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


@pytest.fixture
def res() -> dict:
    return sample.sample_resources(("127.0.0.1", 10000),
                                   {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002)},
                                   {"v1": 90, "v2": 10})


def load(tmp_path: Path, res: dict):
    sample.write_snapshot(tmp_path, ENV, res)
    return load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))


def problems(tmp_path: Path, res: dict) -> tuple[str, ...]:
    with pytest.raises(SnapshotError) as info:
        load(tmp_path, res)
    return info.value.problems


def hcm(res: dict) -> dict:
    return res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


# --- consistency -----------------------------------------------------------------

def test_sample_is_consistent_and_loads(tmp_path, res):
    assert consistency_errors(res) == []
    snap = load(tmp_path, res)
    assert list(snap.kinds["clusters"].resources) == [V1, V2]
    assert snap.versions()["clusters"] == sample.response_document(
        "clusters", res["clusters"])["version_info"]


def test_missing_route_configuration(res):
    hcm(res)["rds"]["route_config_name"] = "8080"
    assert consistency_errors(res) == [
        "listener '127.0.0.1_10000': route configuration '8080' does not exist"]


def test_missing_route_clusters_plain_and_weighted(res):
    routes = res["routes"][0]["virtual_hosts"][0]["routes"]
    routes[0]["route"]["cluster"] = "gone"
    routes[1]["route"]["weighted_clusters"]["clusters"][1]["name"] = "gone-too"
    errors = consistency_errors(res)
    assert len(errors) == 2
    assert all("does not exist" in e for e in errors)
    assert any("'gone'" in e for e in errors) and any("'gone-too'" in e for e in errors)


def test_inline_route_config_and_default_filter_chain_are_checked(res):
    config = hcm(res)
    del config["rds"]
    config["route_config"] = {"name": "inline", "virtual_hosts": [
        {"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                     "route": {"cluster": "nope"}}]}]}
    res["listeners"][0]["default_filter_chain"] = copy.deepcopy(
        res["listeners"][0]["filter_chains"][0])
    errors = consistency_errors(res)
    assert len(errors) == 2 and all("'nope'" in e for e in errors)


def test_tcp_proxy_clusters(res):
    res["listeners"][0]["filter_chains"][0]["filters"][0] = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": TCP_PROXY, "stat_prefix": "tcp",
                         "weighted_clusters": {"clusters": [{"name": V1, "weight": 1},
                                                            {"name": "missing", "weight": 1}]}}}
    assert consistency_errors(res) == [
        "listener '127.0.0.1_10000': tcp_proxy cluster 'missing' does not exist"]


def test_eds_cluster_needs_assignment_strict_dns_does_not(res):
    res["endpoints"] = res["endpoints"][:1]
    assert consistency_errors(res) == [
        f"cluster {V2!r}: EDS cluster has no ClusterLoadAssignment {V2!r}"]
    cluster = res["clusters"][1]
    del cluster["eds_cluster_config"]
    cluster["type"] = "STRICT_DNS"
    cluster["load_assignment"] = {"cluster_name": V2, "endpoints": []}
    assert consistency_errors(res) == []


# --- strict parsing ------------------------------------------------------------

@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r["clusters"][0].update(bogus_field=1), "no field named \"bogus_field\""),
    (lambda r: r["clusters"][0].update(lb_policy="FASTEST"), "Invalid enum value FASTEST"),
    (lambda r: r["clusters"][0].update(lb_policy=99), "resources[0]: unknown enum value at lb_policy = 99"),
    (lambda r: hcm(r).update(codec_type=42), "codec_type = 42"),
    (lambda r: hcm(r).update(not_a_field=True), "no field named \"not_a_field\""),
    (lambda r: hcm(r).update({"@type": "type.googleapis.com/no.such.Type"}),
     "unknown type 'type.googleapis.com/no.such.Type'"),
    (lambda r: r["clusters"].append(copy.deepcopy(r["clusters"][0])), "two resources named"),
], ids=["unknown-field", "enum-name", "enum-number", "nested-enum", "nested-field",
        "unknown-type", "duplicate"])
def test_strict_parse_refuses(tmp_path, res, mutate, expected):
    mutate(res)
    found = problems(tmp_path, res)
    assert any(expected in p for p in found), found


def test_wrong_type_url_and_empty_version(tmp_path, res):
    sample.write_snapshot(tmp_path, ENV, res)
    path = tmp_path / ENV / "envoy" / "routes.json"
    doc = json.loads(path.read_text())
    doc["type_url"] = sample.TYPE_URLS["clusters"]
    path.write_text(json.dumps(doc))
    files = read_files(tmp_path / ENV / "envoy")
    with pytest.raises(SnapshotError, match="type_url is"):
        load_snapshot(ENV, files)
    doc = json.loads(path.read_text())
    doc.update(type_url=sample.TYPE_URLS["routes"], version_info="")
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="version_info is empty"):
        load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))


def test_version_must_match_content(tmp_path, res):
    sample.write_snapshot(tmp_path, ENV, res)
    path = tmp_path / ENV / "envoy" / "endpoints.json"
    doc = json.loads(path.read_text())
    doc["resources"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = 1234                 # a hand edit
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="endpoints.json: version_info .* is not the SHA-256"):
        load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))


def test_half_written_file_is_refused(tmp_path, res):
    sample.write_snapshot(tmp_path, ENV, res)
    path = tmp_path / ENV / "envoy" / "clusters.json"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SnapshotError, match="clusters.json: not JSON"):
        load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))


# --- response bodies ------------------------------------------------------------------

def test_named_bodies_are_built_once_per_name_set_and_bounded(tmp_path, res):
    snap = load(tmp_path, res)
    eds = snap.kinds["endpoints"]
    body = eds.sotw_body(frozenset({V2, V1}))
    assert body == eds.header + eds.resources[V1].sotw_field + eds.resources[V2].sotw_field
    assert eds.sotw_body(frozenset([V1, V2, "not-there"])) == body
    assert eds.sotw_body(frozenset([V1, V2])) is body          # a lookup, not a rebuild
    for i in range(NAMED_BODIES_LIMIT + 10):
        eds.sotw_body(frozenset({V1, f"x{i}"}))
    assert len(eds.named) == NAMED_BODIES_LIMIT                 # bounded; oldest dropped
    assert eds.sotw_body(frozenset([V1, V2])) == body

    rest = RestView.build(snap, rest_config_source("xds_cluster", "1s")).kinds["endpoints"]
    rest_body = rest.body(frozenset({V1}))
    assert json.loads(rest_body)["resources"][0]["cluster_name"] == V1
    assert rest.body(frozenset({V1})) is rest_body


# --- reloads in a running server ---------------------------------------------------

def _snapshots(server: ServerThread) -> dict:
    return requests.get(server.http_url + "/debug/snapshots", timeout=5).json()


def _wait(predicate, timeout: float = 5):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_reload_publishes_only_complete_consistent_files(tmp_path, res, watch):
    sample.write_snapshot(tmp_path, ENV, res)
    good = {k: sample.response_document(k, v)["version_info"] for k, v in res.items()}
    options = Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01,
                      watch=watch, poll_interval=0.05)
    with ServerThread(options) as server:
        assert requests.get(server.http_url + "/readyz", timeout=5).status_code == 200
        # A compile that has so far written only clusters.json (a new EDS cluster whose
        # assignment is not written yet) is not published ...
        grown = sample.sample_resources(("127.0.0.1", 10000),
                                        {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002),
                                         "v3": ("127.0.0.1", 8003)}, {"v1": 90, "v2": 10})
        sample.write_snapshot(tmp_path, ENV, grown, only=("clusters",))
        page = _wait(lambda: (p := _snapshots(server)) and p[ENV]["errors"] and p)
        assert "has no ClusterLoadAssignment" in page[ENV]["errors"][0]
        assert page[ENV]["versions"] == good
        metrics = requests.get(server.http_url + "/metrics", timeout=5).text
        assert 'meshc_xds_snapshot_rejected_total{env="demo"} 1' in metrics
        # ... until the rest lands.
        sample.write_snapshot(tmp_path, ENV, grown)
        page = _wait(lambda: (p := _snapshots(server)) and not p[ENV]["errors"] and p)
        assert page[ENV]["resources"]["clusters"] == sorted(c["name"] for c in grown["clusters"])


def test_reverting_refused_files_clears_the_error(tmp_path, res):
    """Bad files, then the served files back byte for byte: valid again, nothing re-published."""
    sample.write_snapshot(tmp_path, ENV, res)
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01)) as server:
        metrics = server.server.hub.metrics
        published = metrics.value("meshc_xds_snapshots_published_total", env=ENV)
        broken = copy.deepcopy(res)
        broken["clusters"][0]["lb_policy"] = 77
        sample.write_snapshot(tmp_path, ENV, broken)
        page = _wait(lambda: (p := _snapshots(server)) and not p[ENV]["valid"] and p)
        assert "lb_policy = 77" in page[ENV]["errors"][0]
        assert 'meshc_xds_snapshot_valid{env="demo"} 0' in requests.get(
            server.http_url + "/metrics", timeout=5).text

        sample.write_snapshot(tmp_path, ENV, res)      # the served snapshot's bytes again
        page = _wait(lambda: (p := _snapshots(server)) and p[ENV]["valid"] and p)
        assert page[ENV]["errors"] == [] and page[ENV]["rejected_loads"] == 1
        assert 'meshc_xds_snapshot_valid{env="demo"} 1' in requests.get(
            server.http_url + "/metrics", timeout=5).text
        assert metrics.value("meshc_xds_snapshots_published_total", env=ENV) == published

        # The same bad files again are a new refusal, not remembered as seen.
        sample.write_snapshot(tmp_path, ENV, broken)
        page = _wait(lambda: (p := _snapshots(server)) and not p[ENV]["valid"] and p)
        assert page[ENV]["rejected_loads"] == 2


def test_not_ready_until_a_valid_snapshot(tmp_path, res):
    broken = copy.deepcopy(res)
    broken["clusters"][0]["lb_policy"] = 77
    sample.write_snapshot(tmp_path, ENV, broken)
    with ServerThread(Options(rendered=tmp_path, grpc_port=0, http_port=0, debounce=0.01)) as server:
        ready = requests.get(server.http_url + "/readyz", timeout=5)
        assert ready.status_code == 503 and "demo" in ready.text
        sample.write_snapshot(tmp_path, ENV, res)
        _wait(lambda: requests.get(server.http_url + "/readyz", timeout=5).status_code == 200)


def _swap_in(rendered: Path, env: str, res: dict, scratch: Path) -> None:
    """Replace rendered/<env> as a whole with two renames, as `meshc compile` does."""
    staging = rendered / f".{env}.new-1"
    sample.write_snapshot(scratch, env, res)
    (scratch / env).rename(staging)
    old = rendered / f".{env}.old-1"
    (rendered / env).rename(old)
    staging.rename(rendered / env)
    for path in sorted(old.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    old.rmdir()


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_reload_follows_a_directory_swap(tmp_path, res, watch):
    rendered, scratch = tmp_path / "rendered", tmp_path / "scratch"
    sample.write_snapshot(rendered, ENV, res)
    options = Options(rendered=rendered, grpc_port=0, http_port=0, debounce=0.01,
                      watch=watch, poll_interval=0.05)
    with ServerThread(options) as server:
        for weight in (30, 60):
            changed = sample.sample_resources(
                ("127.0.0.1", 10000), {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002)},
                {"v1": 100 - weight, "v2": weight})
            _swap_in(rendered, ENV, changed, scratch)
            want = sample.response_document("routes", changed["routes"])["version_info"]
            _wait(lambda: _snapshots(server)[ENV]["versions"]["routes"] == want)
        assert list(_snapshots(server)) == [ENV]      # staging copies are not environments


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_reload_follows_every_compile(tmp_path, res, watch):
    """`meshc compile` swaps rendered/<env> as a whole (RENAME_EXCHANGE where the kernel
    has it); the watcher must keep following after the first swap, not only see it."""
    rendered = tmp_path / "rendered"

    def compile_weights(weight: int) -> str:
        changed = sample.sample_resources(
            ("127.0.0.1", 10000), {"v1": ("127.0.0.1", 8001), "v2": ("127.0.0.1", 8002)},
            {"v1": 100 - weight, "v2": weight})
        docs = {k: sample.response_document(k, v) for k, v in changed.items()}
        write_rendered(rendered, {ENV: {
            f"envoy/{k}.json": (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()
            for k, d in docs.items()} | {"kustomization.yaml": b"resources: []\n"}})
        return docs["routes"]["version_info"]

    compile_weights(10)
    options = Options(rendered=rendered, grpc_port=0, http_port=0, debounce=0.01,
                      watch=watch, poll_interval=0.05)
    with ServerThread(options) as server:
        for weight in (20, 30, 40):
            want = compile_weights(weight)
            _wait(lambda: _snapshots(server)[ENV]["versions"]["routes"] == want)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """The example repo (policies/, environments/) compiled now into a fresh rendered/,
    so a compiler change that breaks what `serve` accepts fails here."""
    source = source_from_dir(REPO)
    result = compile_source(source, models=False)
    assert result.ok, [str(d) for d in result.diagnostics]
    rendered = tmp_path_factory.mktemp("compiled") / "rendered"
    write_rendered(rendered, result.outputs)
    return rendered, result.environments


def test_compiled_environments_load(compiled):
    """What `meshc compile` emits for every example environment is servable:
    strict parse and consistency pass, and nothing is empty."""
    rendered, environments = compiled
    assert environments, "the example repo defines no environment"
    assert [d.parent.name for d in environment_dirs(rendered)] == sorted(environments)
    for env in environments:
        snapshot = load_snapshot(env, read_files(rendered / env / "envoy"))
        assert all(snapshot.kinds[k].resources for k in ("clusters", "listeners", "routes")), env


# --- a reload parses only what changed --------------------------------------------------------


def test_a_reload_reuses_unchanged_files_and_resources(tmp_path, res):
    sample.write_snapshot(tmp_path, ENV, res)
    first = load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))
    res["routes"][0]["virtual_hosts"][0]["routes"][0]["name"] = "renamed"  # one route configuration changes
    sample.write_snapshot(tmp_path, ENV, res)
    files = read_files(tmp_path / ENV / "envoy")
    second = load_snapshot(ENV, files, previous=first)
    assert second == load_snapshot(ENV, files)  # the same snapshot as a load from nothing
    for kind in ("clusters", "endpoints", "listeners"):
        assert second.kinds[kind] is first.kinds[kind]  # bytes unchanged: the kind itself again
    changed = res["routes"][0]["name"]
    for name, resource in second.kinds["routes"].resources.items():
        assert (resource is first.kinds["routes"].resources[name]) == (name != changed), name


def test_a_file_laid_out_otherwise_is_checked_by_its_content(tmp_path, res):
    """A compact file (not meshc's layout) is checked by `content_version`, not refused."""
    sample.write_snapshot(tmp_path, ENV, res)
    path = tmp_path / ENV / "envoy" / "clusters.json"
    path.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))
    load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))
    doc = json.loads(path.read_text())
    doc["resources"][0]["connect_timeout"] = "9s"  # the version no longer matches
    path.write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="is not the SHA-256 of the rest of the file"):
        load_snapshot(ENV, read_files(tmp_path / ENV / "envoy"))


# --- the fast path of the strict parse agrees with json_format -------------------------------

GOLDEN = Path(__file__).parent / "golden"


def _golden_documents():
    """Every resource (and virtual host) of the golden cases' expected Envoy files."""
    from compiler.xds import protos
    from compiler.xds.snapshot import TYPE_URLS

    vhost = protos.message_class("type.googleapis.com/envoy.config.route.v3.VirtualHost")
    for path in sorted(GOLDEN.glob("*/expected/*/envoy/*.json")):
        kind = path.stem
        if kind not in TYPE_URLS:
            continue
        cls = protos.message_class(TYPE_URLS[kind])
        for item in json.loads(path.read_bytes())["resources"]:
            yield {k: v for k, v in item.items() if k not in ("@type", "virtual_hosts")}, cls
            for host in item.get("virtual_hosts", []) if kind == "routes" else ():
                yield host, vhost


def _both_ways(document, cls):
    """What the fast path makes of `document` (None where it gives up) and what
    json_format makes of it, each as wire bytes or the error's text."""
    from compiler.xds import protos

    def outcome(parse):
        try:
            return parse().SerializeToString(deterministic=True)
        except Exception as exc:    # noqa: BLE001 - ParseError, or whatever json_format's path raises
            return f"{type(exc).__name__}: {exc}"

    fast = cls()
    try:
        protos._fast(copy.deepcopy(document), fast, 0)
    except Exception:   # noqa: BLE001 - gave up: json_format decides
        fast = None
    return (fast.SerializeToString(deterministic=True) if fast is not None else None,
            outcome(lambda: protos.parse_strict(copy.deepcopy(document), cls)),
            outcome(lambda: protos._parse_json(copy.deepcopy(document), cls)))


def test_the_fast_parse_takes_everything_meshc_emits_and_makes_json_formats_messages():
    documents = list(_golden_documents())
    assert len(documents) > 500
    for document, cls in documents:
        fast, chosen, reference = _both_ways(document, cls)
        assert fast is not None, document          # meshc's own output never needs json_format
        assert fast == chosen == reference, document


def _cluster(**fields) -> dict:
    return {"name": "c", "type": "EDS", **fields}


CLUSTER_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@pytest.mark.parametrize("document", [
    _cluster(connect_timeout="0.250s", lb_policy="LEAST_REQUEST"),
    _cluster(lb_policy=2),                                         # an enum by its number
    _cluster(lb_policy=99),                                        # an enum number it does not have
    _cluster(lb_policy="FASTEST"),
    _cluster(per_connection_buffer_limit_bytes={"value": 5}),      # a wrapper as an object: refused
    _cluster(per_connection_buffer_limit_bytes=5),
    _cluster(per_connection_buffer_limit_bytes="5"),
    _cluster(per_connection_buffer_limit_bytes=-5),
    _cluster(per_connection_buffer_limit_bytes=5.0),
    _cluster(per_connection_buffer_limit_bytes=5.5),
    _cluster(circuit_breakers={"thresholds": [{"max_requests": 4294967295, "track_remaining": True}]}),
    _cluster(circuit_breakers={"thresholds": [{"max_requests": 4294967296}]}),   # out of range
    _cluster(circuit_breakers={"thresholds": [None]}),
    _cluster(circuit_breakers={"thresholds": {"max_requests": 1}}),
    _cluster(common_lb_config={"healthy_panic_threshold": {"value": 0}}),
    _cluster(common_lb_config={"healthy_panic_threshold": {"value": float("nan")}}),
    _cluster(common_lb_config={"healthy_panic_threshold": {"value": "NaN"}}),
    _cluster(outlier_detection={"interval": "10s", "consecutive_5xx": 5}),
    _cluster(outlier_detection={"interval": 10}),
    _cluster(outlier_detection={"interval": "ten seconds"}),
    _cluster(connectTimeout="1s"),                                 # a JSON name: json_format takes it
    _cluster(connect_timeout=None),
    _cluster(name=5),
    _cluster(name="\ud800"),                                       # an unpaired surrogate
    _cluster(respect_dns_ttl="true"),
    _cluster(respect_dns_ttl=True),
    _cluster(type="EDS", cluster_type={"name": "x"}),              # two fields of one oneof
    _cluster(metadata={"filter_metadata": {"a": {"k": [1, "x", None, {"n": True}]}}}),   # Struct
    _cluster(typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}},
        "common_http_protocol_options": {"idle_timeout": "3600s"}}}),
    _cluster(typed_extension_protocol_options={"x": {"@type": "type.googleapis.com/no.such.Type"}}),
    _cluster(typed_extension_protocol_options={"x": {}}),
    _cluster(transport_socket={"name": "tls", "typed_config": {
        "@type": TLS, "sni": "a", "common_tls_context": {"alpn_protocols": ["h2"]}}}),
    _cluster(transport_socket={"name": "tls", "typed_config": {"@type": TLS, "sni": "a", "bogus": 1}}),
    _cluster(transport_socket={"name": "tls", "typed_config": {
        "@type": TLS, "common_tls_context": {"tls_params": {"tls_minimum_protocol_version": 77}}}}),
    _cluster(transport_socket={"name": "tls", "typed_config": {
        "@type": "type.googleapis.com/google.protobuf.Duration", "value": "1s"}}),
    _cluster(load_assignment={"cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {
        "address": {"socket_address": {"address": "10.0.0.1", "port_value": 8080}}},
        "load_balancing_weight": 3}]}]}),
    _cluster(dns_lookup_family="V4_ONLY", upstream_bind_config={"source_address": {"address": "1.2.3.4",
                                                                                  "port_value": 70000}}),
], ids=lambda d: json.dumps({k: v for k, v in d.items() if k not in ("name", "type")} or d)[:60])
def test_the_fast_parse_makes_json_formats_message_or_error(document):
    """Where the fast path takes a document, the message is json_format's; where it gives
    up or fails, json_format's own answer (message or error) is what comes out."""
    from compiler.xds import protos

    cls = protos.message_class(CLUSTER_URL)
    fast, chosen, reference = _both_ways(document, cls)
    assert chosen == reference
    if fast is not None:
        assert fast == reference


def test_an_environment_reuses_what_another_holds(tmp_path, res):
    """Two environments with the same clusters: the second's identical file is the first's
    kind, and a changed file reuses the first's unchanged resources; either way the same
    snapshot as a load from nothing."""
    sample.write_snapshot(tmp_path, "a", res)
    res["endpoints"][0]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] = 9001     # one assignment differs
    sample.write_snapshot(tmp_path, "b", res)
    a = load_snapshot("a", read_files(tmp_path / "a" / "envoy"))
    files = read_files(tmp_path / "b" / "envoy")
    b = load_snapshot("b", files, others=[a])
    assert b == load_snapshot("b", files)
    assert b.kinds["clusters"] is a.kinds["clusters"] and b.kinds["routes"] is a.kinds["routes"]
    first, second = sorted(b.kinds["endpoints"].resources)
    assert b.kinds["endpoints"].resources[first] is not a.kinds["endpoints"].resources[first]
    assert b.kinds["endpoints"].resources[second] is a.kinds["endpoints"].resources[second]


def test_an_any_without_a_type_is_a_problem_not_a_traceback(tmp_path, res):
    """`typed_config: {}` parses as an empty Any; it is refused with where it is."""
    hcm(res).clear()
    [problem] = problems(tmp_path, res)
    assert problem.startswith("listeners.json: resources[0]: ") and "has no known @type" in problem


def test_shared_responses_stay_within_their_bound_and_an_oversized_one_evicts_nothing():
    from compiler.xds.snapshot import SharedResponses
    shared = SharedResponses(limit=100)
    built = []

    def body(size: int, tag: bytes):
        return lambda: built.append(tag) or tag * size

    for i in range(4):
        shared.get(i, body(30, b"%d" % i))
    assert shared.get(3, body(30, b"x")) == b"3" * 30          # kept: not built again
    assert shared.get(0, body(30, b"y")) == b"y" * 30          # the oldest went first
    assert shared.get("big", body(200, b"b")) == b"b" * 200    # larger than the bound: not kept ...
    assert shared.get(3, body(30, b"z")) == b"3" * 30          # ... and what was kept stays
    assert shared.get("big", body(200, b"c")) == b"c" * 200
    assert built == [b"0", b"1", b"2", b"3", b"y", b"b", b"c"]
