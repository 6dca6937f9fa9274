"""The Envoy target's properties, held on real inputs: every compiling golden case and the examples.

What the target emits for a given policy is pinned by the golden cases
(`tests/golden/envoy-*`, `warn-envoy-*` and the others: input repo → expected
`envoy/*.json`). The tests here check what must hold for any input: the
discovery-response form and its content-hash versions, determinism, strict
parsing into the real protos, assembly from JSON fragments equal to `lower`,
diagnostics that survive the JSON round trip, and an inconsistent snapshot
treated as a compiler bug.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import replace
from functools import cache as memoized

import orjson
import pytest
from google.protobuf import any_pb2, json_format, symbol_database

from compiler import cache
from compiler.diagnostics import Severity, Span, SpanMap
from compiler.emit import file_bytes, plain
from compiler.load import Source, source_from_dir
from compiler.model import Mesh, Tls, TlsMode
from compiler.pipeline import compile_source
from compiler.targets import envoy
from compiler.targets.envoy import scopes
from compiler.targets.envoy.common import duration
from compiler.xds.consistency import consistency_errors
from compiler.xds.resources import content_version, file_version
from conftest import GOLDEN, REPO
from envoy_meshes import mesh, service
from golden import cases

# Extension modules whose Any-typed configs appear in the output: importing
# them registers their messages in the default pool, so ParseDict resolves them.
_EXTENSIONS = (
    "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
    "envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2",
    "envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2",
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

# --- the inputs: every environment of every compiling golden case, and of the examples ------------

COMPILING = [case for case in cases(GOLDEN) if (GOLDEN / case / "expected").is_dir()]
ENVIRONMENTS = [f"{case}/{env.name}" for case in COMPILING for env in sorted((GOLDEN / case / "expected").iterdir())]
ENVIRONMENTS += [f"examples/{p.stem}" for p in sorted((REPO / "environments").glob("*.yaml"))]
# The environments in which the Envoy target reports something, and what (each a `warn-*` case).
WARNED = {"warn-envoy-passthrough/prod": {"envoy.passthrough-unsupported"},
          "warn-envoy-short-name-clash/prod": {"envoy.ambiguous-short-name"},
          "warn-envoy-ingress-port-conflict/prod": {"envoy.ingress-port-conflict"},
          "warn-version-hash-on-envoy/prod": {"envoy.hash-by-service"},
          "warn-version-hash-on-envoy/staging": {"envoy.hash-by-service"}}


def _root(case: str):
    return REPO if case == "examples" else GOLDEN / case


@memoized
def _source(case: str) -> Source:
    return source_from_dir(_root(case))


@memoized
def _compiled(case: str):
    result = compile_source(_source(case), jobs=1)
    assert result.ok, [d.render() for d in result.diagnostics]
    return result


def real_mesh(name: str) -> Mesh:
    """The mesh of `case/env`, as the pipeline builds it from the case's input."""
    case, env = name.split("/")
    return _compiled(case).meshes[env]


def test_the_inputs_are_every_compiling_case_and_the_examples():
    assert len(COMPILING) >= 30 and {"envoy-tls-modes", "envoy-tcp", "envoy-ingress"} <= set(COMPILING)
    assert {"examples/dev", "examples/prod", "examples/staging"} <= set(ENVIRONMENTS)
    assert set(WARNED) <= set(ENVIRONMENTS)


# --- helpers --------------------------------------------------------------------------------


def lower(*services, address="0.0.0.0"):
    return envoy.lower(mesh(*services, address=address))


def files(lowered) -> dict[str, dict]:
    """The four DiscoveryResponse files by kind (not `envoy/scopes.json`)."""
    return {f.path.removeprefix("envoy/").removesuffix(".json"): json.loads(file_bytes(f)) for f in lowered.files
            if f.path != scopes.PATH}


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


# --- files ----------------------------------------------------------------------------------

_TYPE_URLS = {"clusters": "envoy.config.cluster.v3.Cluster",
              "endpoints": "envoy.config.endpoint.v3.ClusterLoadAssignment",
              "listeners": "envoy.config.listener.v3.Listener",
              "routes": "envoy.config.route.v3.RouteConfiguration"}


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_four_discovery_responses_with_content_hash_versions(name):
    each = real_mesh(name)
    lowered = envoy.lower(each)
    paths = [f.path for f in lowered.files]
    assert [p for p in paths if p != scopes.PATH] == [f"envoy/{k}.json" for k in KINDS]
    assert (scopes.PATH in paths) == any(s.egress is not None for s in each.services)
    assert {f.format for f in lowered.files} == {"json"}
    order = {s.fqdn: i for i, s in enumerate(each.services)}
    for kind, content in files(lowered).items():
        resources = content["resources"]
        assert set(content) == {"version_info", "type_url", "resources"}
        assert content["type_url"] == f"type.googleapis.com/{_TYPE_URLS[kind]}"
        assert {r["@type"] for r in resources} <= {content["type_url"]}
        rest = json.dumps({"resources": resources, "type_url": content["type_url"]}, indent=2, sort_keys=True, ensure_ascii=False)
        assert content["version_info"] == hashlib.sha256(rest.encode() + b"\n").hexdigest()
        names = [r["cluster_name" if kind == "endpoints" else "name"] for r in resources]
        assert len(set(names)) == len(names)
        if kind in ("listeners", "routes"):
            assert names == sorted(names)
        else:  # by service in mesh order (`outbound|PORT|SUBSET|FQDN`), then by name
            keys = [(order[n.split("|")[3]], n) for n in names]
            assert keys == sorted(keys), kind


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_output_is_byte_identical_across_runs(name):
    case, env = name.split("/")

    def render():
        fresh = compile_source(_source(case), jobs=1).meshes[env]  # new model values each time
        return [file_bytes(f) for f in envoy.lower(fresh).files]

    assert render() == render()


# An edit of one value in a golden case's input, and the Envoy types whose version it changes.
EDITS = [
    ("canary-header-retries", "policies/shop/web.yaml", b"timeout: 3s", b"timeout: 4s", {"routes"}),
    ("envoy-connection-pools", "policies/pool/limited.yaml", b"maxConnections: 100", b"maxConnections: 101",
     {"clusters"}),
    ("envoy-clusters-and-endpoints", "environments/prod.yaml", b'"10.0.0.2:9080"', b'"10.0.0.4:9080"',
     {"endpoints"}),
    ("envoy-listeners-and-hosts", "environments/prod.yaml", b"listenerAddress: 127.0.0.1",
     b"listenerAddress: 127.0.0.2", {"listeners"}),
]


@pytest.mark.parametrize("case, path, old, new, changed", EDITS, ids=[e[0] for e in EDITS])
def test_version_changes_only_for_the_type_that_changed(case, path, old, new, changed):
    source = _source(case)
    assert source.files[path].count(old) == 1
    edited = Source({**source.files, path: source.files[path].replace(old, new)})

    def versions(src: Source) -> dict[str, str]:
        result = compile_source(src, jobs=1)
        assert result.ok, [d.render() for d in result.diagnostics]
        [env] = result.meshes
        return {k: v["version_info"] for k, v in files(envoy.lower(result.meshes[env])).items()}

    before, after = versions(source), versions(edited)
    assert {k for k in KINDS if before[k] != after[k]} == changed


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_every_resource_parses_strictly(name):
    for kind, content in files(envoy.lower(real_mesh(name))).items():
        for resource in content["resources"]:
            assert deprecated_fields(parse_strict(resource)) == [], (kind, resource.get("name"))


def test_the_inputs_hold_every_resource_type():
    """So that parsing every resource of the inputs parses each of the four types."""
    assert all(any(files(envoy.lower(real_mesh(n)))[kind]["resources"] for n in ENVIRONMENTS) for kind in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_strict_parsing_refuses_an_unknown_field(kind):
    resource = files(envoy.lower(real_mesh("envoy-ingress/prod")))[kind]["resources"][0]
    parse_strict(resource)
    with pytest.raises(json_format.ParseError):
        parse_strict({**resource, "no_such_field": 1})


@pytest.mark.parametrize("ms, text", [(0, "0s"), (250, "0.250s"), (1500, "1.500s"), (4000, "4s"),
                                      (90_000, "90s"), (5, "0.005s")])
def test_durations_are_protobuf_json(ms, text):
    assert duration(ms) == text


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_version_hashes_the_rest_of_the_file_even_beyond_ascii(name):
    for content in files(envoy.lower(real_mesh(name))).values():
        rest = {"resources": content["resources"], "type_url": content["type_url"]}
        indented = (json.dumps(rest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        assert content["version_info"] == hashlib.sha256(indented).hexdigest() == content_version(**rest)


SCOPED = [n for n in ENVIRONMENTS if any(s.egress is not None for s in real_mesh(n).services)]


def test_the_inputs_hold_scoped_services():
    assert {"egress-sidecar/prod", "sidecar-credentials/prod", "examples/prod"} <= set(SCOPED)


@pytest.mark.parametrize("name", SCOPED)
def test_every_scope_is_a_consistent_cut_of_the_snapshot(name):
    """What a proxy of a service with `egress` receives names only resources of the
    snapshot, and references nothing outside itself: its listeners' route configurations,
    its routes' and TCP proxies' clusters (mirrors included), its EDS clusters' assignments."""
    lowered = envoy.lower(real_mesh(name))
    [scope_file] = [f for f in lowered.files if f.path == scopes.PATH]
    document = json.loads(file_bytes(scope_file))
    version = document.pop("version_info")
    assert version == file_version(document)
    snapshot = {kind: {r["cluster_name" if kind == "endpoints" else "name"]: r for r in content["resources"]}
                for kind, content in files(lowered).items()}
    for service, entries in document["egress"].items():
        namespaces = {e[:-2] for e in entries if e.endswith("/*")}
        callees = [v for k, v in document["services"].items() if k in entries or k.split("/")[0] in namespaces]
        assert callees, service
        cut = {kind: [snapshot[kind][n] for c in callees for n in c[kind]] for kind in ("clusters", "endpoints", "listeners")}
        hosts = {}
        for c in callees:
            for config, names in c["routes"].items():
                hosts.setdefault(config, set()).update(names)
        cut["routes"] = [{**snapshot["routes"][config], "virtual_hosts": [h for h in snapshot["routes"][config]["virtual_hosts"]
                                                                         if h["name"] in names]}
                         for config, names in hosts.items()]
        assert all(r["virtual_hosts"] for r in cut["routes"])
        assert consistency_errors(cut) == [], service


def test_the_inputs_hold_a_file_beyond_ascii():
    """envoy-route-destinations matches a header value with é, ☃, a backslash and a quote."""
    [routes] = [f for f in envoy.lower(real_mesh("envoy-route-destinations/prod")).files if f.path == "envoy/routes.json"]
    assert any(b >= 0x7F for b in file_bytes(routes))


# --- TLS with credentialName (the rule is being changed: these stay hand-built for now) -------------

def _tls_context(lowered, version=""):
    socket = by_name(lowered, "clusters")[f"outbound|9080|{version}|{FQDN}"]["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert socket["typed_config"]["@type"] == \
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return socket["typed_config"]


_SDS = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "1s"}  # a secret the server lacks holds a SotW proxy back 1 s


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


# --- consistency ----------------------------------------------------------------------------

def test_an_inconsistent_snapshot_is_a_compiler_bug(monkeypatch):
    from compiler.targets.envoy import endpoints
    monkeypatch.setattr(endpoints, "lower", lambda upstreams: [])
    with pytest.raises(envoy.InconsistentSnapshot) as error:
        envoy.lower(real_mesh("envoy-clusters-and-endpoints/prod"))
    assert any("has no ClusterLoadAssignment" in p for p in error.value.problems)


def test_an_inconsistent_snapshot_reaches_the_parent_whole():
    """Raised in a worker process, it is pickled to the parent."""
    import pickle

    from compiler.targets.envoy import InconsistentSnapshot

    again = pickle.loads(pickle.dumps(InconsistentSnapshot("prod", ["route 'x' names no cluster"])))
    assert again.environment == "prod" and again.problems == ("route 'x' names no cluster",)
    assert "inconsistent" in str(again)


# --- per-service fragments and assemble -------------------------------------------------------
#
# The pipeline lowers each service on its own (in worker processes, or not at
# all when its cache holds the fragment as JSON) and assembles an environment
# from the fragments alone. These tests hold that to `lower`, byte for byte.

def _rendered(lowered) -> tuple:
    """What a lowering amounts to: each file's bytes as emitted, and the diagnostics in order."""
    return [(f.path, f.format, file_bytes(f)) for f in lowered.files], lowered.diagnostics


def _through_cache(fragment):
    """A fragment as a re-compile gets it back: a record (JSON bytes) and its pieces, unpacked."""
    record, pieces = cache.pack_record(fragment)
    return cache.unpack(orjson.loads(record), dict(pieces))


def _through_json(each: Mesh):
    """The environment assembled from its services' fragments, each through the cache's JSON."""
    return envoy.assemble(each.environment, [_through_cache(envoy.lower_service(s, each.environment))
                                             for s in each.services])


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


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_assemble_from_json_fragments_equals_lower(name):
    each = real_mesh(name)
    fragments = [envoy.lower_service(s, each.environment) for s in each.services]
    assert [_through_cache(f) for f in fragments] == fragments
    assert _rendered(_through_json(each)) == _rendered(envoy.lower(each))


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_the_pipeline_emits_what_lower_does(name):
    case, env = name.split("/")
    lowered = envoy.lower(real_mesh(name))
    assert lowered.files
    for f in lowered.files:
        assert _compiled(case).outputs[env][f.path] == file_bytes(f), f.path


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_fragments_are_plain_json(name):
    each = real_mesh(name)
    for svc in each.services:
        record, _ = cache._pack(envoy.lower_service(svc, each.environment))  # before orjson, which takes tuples
        orjson.dumps(record)  # no `default`: anything orjson cannot write natively fails here
        _assert_plain_json(record)


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_diagnostics_keep_their_spans_through_json(name):
    each = real_mesh(name)
    diagnostics = _through_json(each).diagnostics
    assert diagnostics == envoy.lower(each).diagnostics
    assert {d.code for d in diagnostics} == WARNED.get(name, set())
    # as the pipeline reports them, at the same places
    case, env = name.split("/")
    assert [d for d in _compiled(case).diagnostics if d.code.startswith("envoy.")] == list(diagnostics)


@pytest.mark.parametrize("name", sorted(WARNED))
def test_every_envoy_diagnostic_points_into_the_policy(name):
    diagnostics = _through_json(real_mesh(name)).diagnostics
    assert diagnostics and all(isinstance(d.span, Span) and d.span.path.startswith("policies/") for d in diagnostics)


def test_diagnostics_without_spans_survive_json_as_none():
    each = real_mesh("warn-envoy-passthrough/prod")
    unlocated = replace(each, services=tuple(replace(s, spans=SpanMap()) for s in each.services))
    [diagnostic] = _through_json(unlocated).diagnostics
    assert (diagnostic.code, diagnostic.span) == ("envoy.passthrough-unsupported", None)
    [located] = _through_json(each).diagnostics
    assert located.span is not None and replace(located, span=None) == diagnostic


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_assemble_leaves_its_fragments_alone(name):
    # The pipeline may hold fragments in memory across compiles; assemble shares values with them.
    each = real_mesh(name)
    fragments = [envoy.lower_service(s, each.environment) for s in each.services]
    before = orjson.dumps(plain(fragments))
    envoy.assemble(each.environment, fragments)
    envoy.assemble(each.environment, fragments)
    assert orjson.dumps(plain(fragments)) == before
