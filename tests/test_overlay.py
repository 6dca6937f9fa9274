"""Overlays: the merged spec and its spans, against the plain definition of a deep merge."""

from __future__ import annotations

import random

import pytest

from compiler.diagnostics import Span, SpanMap
from compiler.overlay import Layer, effective


def _value(rng: random.Random, depth: int):
    roll = rng.random()
    if depth < 3 and roll < 0.45:
        return {k: _value(rng, depth + 1) for k in rng.sample("abcd", rng.randint(1, 3))}
    if roll < 0.6:
        return None  # removes the key
    return rng.choice([1, "x", [1, 2], True])


def _layer(rng: random.Random, file: str) -> Layer:
    data = {k: _value(rng, 1) for k in rng.sample("abcd", rng.randint(0, 4))}
    spans: dict = {}

    def walk(value, path):
        spans[path] = Span(file, len(spans) + 1, 1)
        spans[path + (SpanMap.KEY,)] = Span(file, len(spans) + 1, 2)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, path + (k,))

    for k, v in data.items():
        walk(v, (k,))
    return Layer(data, SpanMap(spans))


def _reference(layers: list[Layer]) -> tuple[dict, dict]:
    """Deep merge, spans merged alongside: every span below a replaced or removed key goes first."""
    spec: dict = {}
    spans: dict = {}

    def drop(prefix):
        for p in [p for p in spans if p[: len(prefix)] == prefix]:
            del spans[p]

    def merge(base, over, path, layer):
        out = dict(base)
        for key, value in over.items():
            here = path + (key,)
            if value is None:
                out.pop(key, None)
                drop(here)
                spans[here + (SpanMap.REMOVED,)] = layer.spans.at(here)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, here, layer)
            else:
                out[key] = value
                drop(here)
                spans.update((p, s) for p, s in layer.spans.items() if p[: len(here)] == here)
        if path:
            for suffix in ((), (SpanMap.KEY,)):
                if layer.spans.exact(path + suffix) is not None:
                    spans[path + suffix] = layer.spans.exact(path + suffix)
        return out

    for layer in layers:
        spec = merge(spec, layer.data, (), layer)
    return spec, spans


@pytest.mark.parametrize("seed", range(300))
def test_effective_spec_and_spans_equal_the_plain_deep_merge(seed):
    rng = random.Random(seed)
    defaults, policy, override = (_layer(rng, name) for name in ("env.yaml#defaults", "policy.yaml", "env.yaml#override"))
    eff = effective(defaults, policy, override)
    spec, spans = _reference([defaults, policy, override])
    assert eff.spec == spec
    assert dict(eff.spans.items()) == spans
