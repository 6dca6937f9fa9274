"""Every emitted Kubernetes document validates against the real schemas.

Istio documents are checked against the CRDs' own OpenAPI v3 schemas
(`tests/schemas/istio-crds.yaml`, the served v1 version of each kind),
made strict the way the API server is: an object schema that lists its
`properties` refuses any other key (Kubernetes prunes unknown fields, and
`kubectl apply --validate=strict` refuses them), and the CRDs' `oneOf`
constructs (StringMatch, loadBalancer, consistentHash, ...) are honoured as
written. Services are checked against the strict core/v1 Service schema.
The negative controls prove the validators do refuse what they must.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache

import jsonschema
import pytest
import yaml

from compiler.load import source_from_dir
from compiler.pipeline import compile_source
from conftest import GOLDEN, REPO, SCHEMAS

ISTIO_KINDS = ("DestinationRule", "Gateway", "ServiceEntry", "Sidecar", "VirtualService")
GOOD = ["examples"] + [p.name for p in sorted(GOLDEN.iterdir()) if (p / "expected.txt").is_file()
                       and (p / "expected.txt").read_text().startswith("exit: 0")]

_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("uint32")
def _uint32(value) -> bool:
    return not isinstance(value, int) or 0 <= value < 2**32


def strict(schema):
    """A copy of an OpenAPI schema in which every listed object refuses unlisted keys."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("items", "additionalProperties", "not", "oneOf", "anyOf", "allOf") else v
           for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The validator of `spec` for a networking.istio.io kind, served version v1."""
    for crd in _crds():
        if crd["spec"]["group"] == "networking.istio.io" and crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            assert version["served"], f"{kind} v1 is not served"
            spec_schema = strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
            # OpenAPI v3.0 schemas are JSON Schema draft 4 plus a few keywords jsonschema ignores.
            jsonschema.Draft4Validator.check_schema(spec_schema)
            return jsonschema.Draft4Validator(spec_schema, format_checker=_FORMATS)
    raise KeyError(kind)


@lru_cache(maxsize=1)
def _crds() -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all((SCHEMAS / "istio-crds.yaml").read_text(), Loader=loader) if d]


@lru_cache(maxsize=1)
def service_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / "k8s-service-v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)


def errors_of(doc: dict) -> list[str]:
    """Every schema problem of one emitted document, as readable lines (empty when valid)."""
    kind = doc["kind"]
    if kind == "Service":
        assert doc["apiVersion"] == "v1"
        errors = service_validator().iter_errors(doc)
    else:
        assert kind in ISTIO_KINDS and doc["apiVersion"] == "networking.istio.io/v1", kind
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        errors = crd_validator(kind).iter_errors(doc["spec"])
    return [f"{kind} {doc['metadata']['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@lru_cache(maxsize=None)
def emitted(case: str) -> list[tuple[str, dict]]:
    """(file, document) for every Kubernetes document a case compiles to, all environments."""
    root = REPO if case == "examples" else GOLDEN / case
    result = compile_source(source_from_dir(root))
    assert result.ok, [d.render() for d in result.diagnostics]
    docs = []
    for env, files in sorted(result.outputs.items()):
        for path, data in sorted(files.items()):
            if path.startswith("istio/"):
                docs += [(f"{env}/{path}", d) for d in yaml.safe_load_all(data)]
    return docs


@pytest.mark.parametrize("case", GOOD)
def test_every_emitted_document_validates(case):
    docs = emitted(case)
    assert docs
    problems = [f"{where}: {line}" for where, doc in docs for line in errors_of(doc)]
    assert problems == []


def test_the_cases_cover_every_kind_and_feature():
    docs = [d for case in GOOD for _, d in emitted(case)]
    assert {d["kind"] for d in docs} == {"Service", *ISTIO_KINDS}
    lbs = [d["spec"]["trafficPolicy"]["loadBalancer"] for d in docs
           if d["kind"] == "DestinationRule" and "loadBalancer" in d["spec"].get("trafficPolicy", {})]
    hashes = {next(iter(lb["consistentHash"])) for lb in lbs if "consistentHash" in lb}
    assert hashes == {"httpHeaderName", "httpCookie", "useSourceIp"}
    vs = [d["spec"] for d in docs if d["kind"] == "VirtualService"]
    assert any("tcp" in s for s in vs) and any("gateways" in s for s in vs)
    matches = {k for s in vs for r in s.get("http", []) for m in r.get("match", []) for h in m.get("headers", {}).values() for k in h}
    assert matches == {"exact", "prefix", "regex"}


# -- negative controls: the validators refuse what Kubernetes would refuse --------------------


def _first(case: str, kind: str, name: str | None = None) -> dict:
    return copy.deepcopy(next(d for _, d in emitted(case) if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)))


@pytest.fixture
def reviews_vs() -> dict:
    return _first("examples", "VirtualService", "reviews")


def test_control_the_valid_documents_pass(reviews_vs):
    assert errors_of(reviews_vs) == []


def test_control_an_unknown_field_in_a_virtual_service_spec(reviews_vs):
    reviews_vs["spec"]["timeout"] = "4s"  # belongs on a route, not the spec
    assert any("Additional properties are not allowed ('timeout'" in e for e in errors_of(reviews_vs))


def test_control_an_unknown_field_deep_in_a_route(reviews_vs):
    reviews_vs["spec"]["http"][1]["route"][0]["destination"]["subsets"] = "v1"
    assert any("http/1/route/0/destination" in e and "'subsets'" in e for e in errors_of(reviews_vs))


def test_control_a_weight_as_a_string(reviews_vs):
    reviews_vs["spec"]["http"][1]["route"][0]["weight"] = "95"
    assert any("http/1/route/0/weight: '95' is not of type 'integer'" in e for e in errors_of(reviews_vs))


def test_control_a_weight_beyond_int32(reviews_vs):
    reviews_vs["spec"]["http"][1]["route"][0]["weight"] = 2**31
    assert any("is not a 'int32'" in e for e in errors_of(reviews_vs))


def test_control_a_string_match_with_two_kinds_breaks_its_one_of(reviews_vs):
    reviews_vs["spec"]["http"][0]["match"][0]["headers"]["x-canary"] = {"exact": "on", "prefix": "o"}
    assert any("x-canary" in e and "is valid under each of" in e for e in errors_of(reviews_vs))


def test_control_a_load_balancer_both_simple_and_hashed():
    dr = _first("examples", "DestinationRule", "reviews")
    dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"] = {"useSourceIp": True}
    assert any("trafficPolicy/loadBalancer" in e and "is valid under each of" in e for e in errors_of(dr))


def test_control_a_hash_on_two_keys():
    dr = _first("examples", "DestinationRule", "ratings")
    dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["useSourceIp"] = True
    assert any("consistentHash" in e and "is valid under each of" in e for e in errors_of(dr))


def test_control_an_unknown_tls_mode():
    dr = _first("examples", "DestinationRule", "reviews")
    dr["spec"]["trafficPolicy"]["tls"]["mode"] = "ISTIO_MUTAL"
    assert any("tls/mode: 'ISTIO_MUTAL' is not one of" in e for e in errors_of(dr))


def test_control_a_gateway_server_without_port_name_or_hosts():
    gw = _first("examples", "Gateway")
    del gw["spec"]["servers"][0]["hosts"]
    assert any("'hosts' is a required property" in e for e in errors_of(gw))


def test_control_a_service_port_as_a_string_and_an_unknown_field():
    svc = _first("examples", "Service", "reviews")
    svc["spec"]["ports"][0]["port"] = "9080"
    svc["spec"]["selectors"] = {"app": "reviews"}
    problems = errors_of(svc)
    assert any("spec/ports/0/port: '9080' is not of type 'integer'" in e for e in problems)
    assert any("'selectors' was unexpected" in e for e in problems)
