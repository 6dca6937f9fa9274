"""Overlays: an environment's `defaults` under a policy's spec, its override over it.

`effective(...)` deep-merges the three layers (mappings key by key; lists and
scalars replace; an explicit `null` removes the key) and merges their span
maps the same way, so every value of the effective spec still knows which
file and line set it. `overlay_note` builds the note an overlay diagnostic
carries: where the policy had set the value the environment overrides.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.diagnostics import Note, SpanMap


@dataclass(frozen=True)
class Layer:
    data: dict
    spans: SpanMap  # paths relative to `data`


@dataclass(frozen=True)
class Effective:
    spec: dict
    spans: SpanMap
    policy_spans: SpanMap  # the policy's own spec spans, for overlay notes


def effective(defaults: Layer | None, policy: Layer, override: Layer | None) -> Effective:
    """`defaults` ⊕ `policy` ⊕ `override`, each later layer winning."""
    spec: dict = {}
    spans: dict = {}
    for layer in (defaults, policy, override):
        if layer is not None:
            spec = _merge(spec, layer.data, (), spans, layer.spans)
    return Effective(spec, SpanMap(spans), policy.spans)


def _merge(base: dict, over: dict, path: tuple, spans: dict, over_spans: SpanMap) -> dict:
    out = dict(base)
    for key, value in over.items():
        here = path + (key,)
        # Spans below `here` come from an earlier layer's value or removal of it; most keys have neither.
        earlier = key in out or here + (SpanMap.REMOVED,) in spans
        if value is None:
            out.pop(key, None)
            if earlier:
                _drop(spans, here)
            spans[here + (SpanMap.REMOVED,)] = over_spans.at(here)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, here, spans, over_spans)
        else:
            out[key] = value
            if earlier:
                _drop(spans, here)
            _copy(over_spans, here, spans)
    if path:
        # The mapping itself is attributed to the layer that last touched it.
        for suffix in ((), (SpanMap.KEY,)):
            span = over_spans.exact(path + suffix)
            if span is not None:
                spans[path + suffix] = span
    return out


def _drop(spans: dict, prefix: tuple) -> None:
    n = len(prefix)
    for p in [p for p in spans if p[:n] == prefix]:
        del spans[p]


def _copy(src: SpanMap, prefix: tuple, dst: dict) -> None:
    dst.update(src.items_under(prefix))


def overlay_note(eff: Effective):
    """A `note(path)` for diagnostics on an effective spec: points at the policy's own value."""

    def note(path: tuple) -> Note | None:
        # A key an overlay's null removed has no span of its own: the null's span says who removed it.
        here = eff.spans.removed_at(path) or eff.spans.at(path)
        if here is None or here.path == _file_of(eff.policy_spans):
            return None
        return policy_note(eff.policy_spans, path)

    return note


def policy_note(policy_spans: SpanMap, path: tuple) -> Note | None:
    """A note at the policy's own value at `path` (spec-relative), else at the policy itself."""
    exact = policy_spans.exact(path)
    if exact is not None:
        return Note("the policy's own value, overridden by the environment", exact)
    root = policy_spans.at(())
    return Note("in the policy this applies to", root) if root else None


def _file_of(spans: SpanMap) -> str | None:
    root = spans.at(())
    return root.path if root else None
