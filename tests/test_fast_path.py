"""The schema fast path (`_fast_mapping_ok`) and cerberus always reach the same verdict.

`compiler.schema.validate` trusts the fast path when it accepts and asks
cerberus for the messages when it refuses; a disagreement either lets a bad
document through or drops a good one without a word. So the two are held to
the same answer on every document in the repo (examples and golden cases) and
on a few hundred seeded random mutations of the valid ones.
"""

from __future__ import annotations

import copy
import random

import pytest

from compiler import schema
from compiler.diagnostics import Diagnostics, SpanMap
from compiler.load import parse
from conftest import GOLDEN, REPO

SCHEMAS = {"POLICY": schema.POLICY, "ENVIRONMENT": schema.ENVIRONMENT, "SPEC": schema.SPEC, "PARTIAL_SPEC": schema.PARTIAL_SPEC}
_VALIDATORS = {name: schema._validator_class()(s) for name, s in SCHEMAS.items()}  # reusable; building one costs ms

# Replacement values: wrong types, edges of every range, nulls and strings every rule refuses.
ODD_VALUES = (
    None, True, False, 0, -1, 1, 7, 100, 101, 65535, 65536, 2**40, 1.5, float("nan"), "", "x", "UPPER", "a" * 64,
    "web\n", "../x", "10 s", "0ms", "0.5ms", "1.0005s", "250ms", "2m", "LEAST_CONN", "ISTIO_MUTUAL", "TCP", "on",
    "10.0.0.1:80", "10.0.0.1", "host:99999", [], ["x"], [1], [{}], {}, {"x": 1}, {"consistentHash": {"sourceIp": False}},
    {"consistentHash": {"cookie": {"name": "c", "ttl": 5}}}, {"v1": ["10.0.0.1:80"]}, {"exact": "a", "prefix": "b"},
    "1500ms", "UPGRADE", {"simple": "RANDOM", "warmup": "30s"}, {"simple": None, "warmup": "1m"}, {"time": "60s"},
    {"loadBalancer": "RANDOM", "tls": {"mode": "DISABLE"}},
)  # fmt: skip


def _documents() -> list[tuple[str, dict]]:
    """Every parseable policy and environment file in the examples and the golden cases."""
    roots = [REPO, *sorted(p for p in GOLDEN.iterdir() if p.is_dir())]
    out = []
    for root in roots:
        for path in sorted([*root.glob("policies/**/*.yaml"), *root.glob("environments/*.yaml")]):
            doc = parse(path.relative_to(root).as_posix(), path.read_bytes(), Diagnostics())
            if doc is not None and isinstance(doc.data, dict):
                out.append((f"{root.name}/{path.relative_to(root)}", doc.data))
    return out


DOCUMENTS = _documents()


def _targets(doc: dict) -> list[tuple[str, object]]:
    """(schema name, value) pairs a document offers: itself, its spec, its overlay fragments."""
    kind = doc.get("kind")
    spec = doc.get("spec")
    if kind == "Environment":
        out = [("ENVIRONMENT", doc)]
        if isinstance(spec, dict):
            if isinstance(spec.get("defaults"), dict):
                out.append(("PARTIAL_SPEC", spec["defaults"]))
            for fragment in (spec.get("overrides") or {}).values() if isinstance(spec.get("overrides"), dict) else ():
                if isinstance(fragment, dict):
                    out.append(("PARTIAL_SPEC", fragment))
        return out
    out = [("POLICY", doc)]
    if isinstance(spec, dict):
        out += [("SPEC", spec), ("PARTIAL_SPEC", spec)]
    return out


def assert_agree(name: str, value, where: str) -> bool:
    fast = schema._fast_mapping_ok(value, SCHEMAS[name])
    slow = _VALIDATORS[name].validate(value)
    assert fast == slow, f"{where}: fast path says {fast}, cerberus says {slow} under {name}: {value!r} {_VALIDATORS[name].errors}"
    return slow


@pytest.mark.parametrize("where,doc", DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_every_document_in_the_repo(where, doc):
    for name, value in _targets(doc):
        assert_agree(name, value, where)


def test_the_good_examples_are_accepted_by_both():
    good = [(w, d) for w, d in DOCUMENTS if not w.startswith("bad-")]
    assert len(good) >= 15
    for where, doc in good:
        for name, value in _targets(doc):
            assert assert_agree(name, value, where), f"{where} is a good document but {name} refuses it"


# -- seeded random mutations -----------------------------------------------------------------


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def _parent(doc, path):
    node = doc
    for part in path[:-1]:
        node = node[part]
    return node


def mutate(doc: dict, rng: random.Random) -> dict:
    """One or two random edits: drop, rename or add a key; replace a value with an odd one."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.choice((1, 1, 2))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            doc[rng.choice(("extra", "timeout", "spec"))] = rng.choice(ODD_VALUES)
            continue
        path = rng.choice(paths)
        parent, last = _parent(doc, path), path[-1]
        op = rng.choice(("drop", "rename", "retype", "retype", "retype", "add"))
        if op == "drop":
            del parent[last]
        elif op == "rename" and isinstance(last, str):
            new = rng.choice((last[:-1] or "x", last + "s", last.upper(), last.replace("e", "a", 1), "Bad_Key"))
            parent[new] = parent.pop(last)
        elif op == "add" and isinstance(parent[last], dict):
            parent[last][rng.choice(("extra", "timout", "weigth", "v9", "x-y"))] = rng.choice(ODD_VALUES)
        else:
            parent[last] = copy.deepcopy(rng.choice(ODD_VALUES))
    return doc


VALID = [(w, name, value) for w, doc in DOCUMENTS if not w.startswith("bad-") for name, value in _targets(doc)]


@pytest.mark.parametrize("seed", range(4))
def test_random_mutations(seed):
    rng = random.Random(seed)
    verdicts = {True: 0, False: 0}
    for _ in range(100):
        where, name, value = rng.choice(VALID)
        mutated = mutate(value, rng)
        ok = assert_agree(name, mutated, f"seed {seed}, mutation of {where}")
        verdicts[ok] += 1
        # The whole of `validate`, messages included: same verdict, an error for every refusal, no exception.
        diags = Diagnostics()
        assert schema.validate(mutated, SCHEMAS[name], SpanMap(), diags) is ok
        assert diags.has_errors is not ok, f"{where} mutated: {mutated!r}"
    assert verdicts[False] > 30 and verdicts[True] > 5  # the mutations reach both sides


@pytest.mark.parametrize("name", ["POLICY", "SPEC", "PARTIAL_SPEC"])
def test_a_null_load_balancer_beside_another_error(name):
    # cerberus runs check_with on nulls too; `loadBalancer: null` used to crash it with a TypeError.
    spec = {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}], "loadBalancer": None, "timeout": 5}
    doc = {"apiVersion": "meshc.dev/v1", "kind": "TrafficPolicy", "metadata": {"name": "web", "namespace": "shop"}, "spec": spec}
    value = doc if name == "POLICY" else spec
    assert assert_agree(name, value, "loadBalancer: null") is False
    diags = Diagnostics()
    assert schema.validate(value, SCHEMAS[name], SpanMap(), diags) is False and diags.has_errors


def test_a_trailing_newline_is_refused_by_both():
    # cerberus matches `regex + "$"`, which accepts "web\n"; the fast path fullmatches.
    # They used to disagree, and the policy vanished from the output without a diagnostic.
    doc = copy.deepcopy(next(d for w, d in DOCUMENTS if w == "overlays/policies/shop/web.yaml"))
    doc["metadata"]["name"] = "web\n"
    assert assert_agree("POLICY", doc, "name with a newline") is False
