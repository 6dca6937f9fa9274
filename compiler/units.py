"""Units: one service in one environment, compiled — merge → model → check → lower.

`compile_units` is the stage. Each unit is a pure function of one policy file and
one environment file: the overlay merge (`overlay.effective`), the schema check of
what an overlay touched, the model (`build.service`), the per-service checks
(`check.service`) and each target's fragment (`lower_service`), plus what the
service claims in its environment (`check.Claims`) for the checks between
services. Units come from the cache where it holds them, and are otherwise
computed, in forked worker processes when there are many (`workers`). A unit
read from the cache and one computed here are the same value: its claims carry
their spans either way; only its model is rebuilt on demand (`Unit.model`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import orjson

from compiler import build, check, schema, workers
from compiler import model as m
from compiler.cache import pack_record, unit_key
from compiler.diagnostics import Diagnostic, Diagnostics, SpanMap
from compiler.overlay import Layer, effective, overlay_note
from compiler.targets import registry
from compiler.validate import EnvironmentFile, Policy, check_endpoints, check_keys

__all__ = ["EnvContext", "Unit", "compile_units", "service"]


@dataclass(frozen=True)
class EnvContext:
    """What every unit of one environment reads: its model, its overlay layers."""

    file: EnvironmentFile
    env: m.Environment

    @classmethod
    def of(cls, env_file: EnvironmentFile, policies: list[Policy], diags: Diagnostics) -> "EnvContext":
        spec, spans = env_file.spec, env_file.spans
        check_keys(spec, spans, {p.key for p in policies}, diags)
        return cls(env_file, build.environment(env_file.name, spec, spans))

    @cached_property
    def layers(self) -> "EnvLayers":
        """Split out on first use: a re-compile whose units all come from the cache never needs it."""
        return EnvLayers(self.file)


@dataclass(frozen=True)
class Unit:
    """One service in one environment, compiled: each target's fragment and the service's claims.

    `fragments` is empty when the service did not compile (its `diagnostics` say why).
    The cache stores clean units only (no diagnostics), as JSON and pieces. The claims
    travel as their JSON text (`claims_json`): what the checks between services are
    keyed by, read back into `check.Claims` only when those checks run. `model`
    gives the service's model: the one this run built when it kept it, else rebuilt.
    """

    key: str
    claims_json: str  # `check.Claims.to_json()`, serialised
    fragments: dict  # target NAME → what its `lower_service` returned (JSON-able, with pieces)
    diagnostics: tuple[Diagnostic, ...] = ()
    built: m.Service | None = field(default=None, compare=False)  # the model, when this run kept it
    _claims: check.Claims | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, key: str, claims: check.Claims, fragments: dict, diagnostics: tuple[Diagnostic, ...] = (),
           built: m.Service | None = None) -> "Unit":
        return cls(key, orjson.dumps(claims.to_json()).decode(), fragments, diagnostics, built, claims)

    @property
    def claims(self) -> check.Claims:
        if self._claims is None:
            object.__setattr__(self, "_claims", check.Claims.from_json(orjson.loads(self.claims_json)))
        return self._claims

    @property
    def failed(self) -> bool:
        """The service did not compile: what it would claim is unknown."""
        return not self.fragments

    def model(self, ctx: EnvContext, policy: Policy) -> m.Service | None:
        """The service's model in `ctx` (None when it does not compile)."""
        return self.built or service(ctx, policy, Diagnostics())

    def to_json(self) -> dict:
        return {"claims": self.claims_json, "fragments": self.fragments}

    @classmethod
    def from_json(cls, key: str, value: dict) -> "Unit":
        return cls(key, value["claims"], value["fragments"])


def compile_units(contexts: list[EnvContext], policies: list[Policy], cache, jobs: int | None,
                  models: bool) -> dict[tuple[str, str], Unit]:
    """Every (environment name, policy key) unit: from `cache` (a `Cache` or `NoCache`) where
    it holds one, else computed, and then stored when clean. With `models`, each computed
    unit keeps its model for the caller."""
    pairs = [(ci, pi) for ci in range(len(contexts)) for pi in range(len(policies))]
    keys = [unit_key(policies[pi].file_key, contexts[ci].file.file_key) for ci, pi in pairs]

    def compute(indexes: list[int], pack: bool) -> list[tuple[Unit, tuple | None]]:
        return _compute(contexts, policies, [pairs[i] for i in indexes], jobs, pack, models)

    def decode(i: int, value: dict) -> Unit:
        return Unit.from_json(policies[pairs[i][1]].key, value)

    units = cache.units(keys, compute, decode)
    return {(contexts[ci].env.name, policies[pi].key): unit for (ci, pi), unit in zip(pairs, units)}


def _compute(contexts, policies, todo, jobs, pack: bool, models: bool) -> list[tuple[Unit, tuple | None]]:
    """Each (context, policy) unit of `todo`, and with `pack` a clean one's cache record
    (`cache.pack_record`), made where the unit was: in worker processes when there are many."""
    jobs = workers.count(jobs)
    for _, pi in todo:
        policies[pi].document()  # parse in the parent: workers inherit it
    if jobs <= 1 or len(todo) < workers.PARALLEL_THRESHOLD:
        return _compute_items((contexts, policies, pack, models), todo)
    # A policy's units go to one worker: its Service and DestinationRule, the same in every
    # environment, are then rendered once.
    per_chunk = -(-(max(pi for _, pi in todo) + 1) // (jobs * workers.CHUNKS_PER_WORKER))
    by_chunk: dict[int, list] = {}
    for item in todo:
        by_chunk.setdefault(item[1] // per_chunk, []).append(item)
    chunks = list(by_chunk.values())
    results = workers.map_inherited(_compute_items, (contexts, policies, pack, models), chunks, jobs)
    by_item = {}
    for chunk, computed in zip(chunks, results):
        by_item.update(zip(chunk, computed))
    return [by_item[item] for item in todo]


def _compute_items(work, items) -> list[tuple[Unit, tuple | None]]:
    contexts, policies, pack, models = work
    out = []
    for ci, pi in items:
        unit = _unit(contexts[ci], policies[pi], keep_spans=not pack, keep_model=models or not pack)
        clean = pack and bool(unit.fragments) and not unit.diagnostics  # the cache keeps clean units only
        out.append((unit, pack_record(unit.to_json()) if clean else None))
    return out


def _unit(ctx: EnvContext, policy: Policy, keep_spans: bool, keep_model: bool) -> Unit:
    """One unit. Its model is kept (with its spans, or without) only for a caller that reads it:
    what a worker keeps travels back to the parent. A unit with diagnostics keeps its model."""
    diags = Diagnostics()
    svc = service(ctx, policy, diags)
    if svc is None:
        return Unit.of(policy.key, check.Claims(policy.key, failed=True), {}, tuple(diags))
    fragments = {target.NAME: target.lower_service(svc, ctx.env) for target in registry()}
    claims = check.Claims.of(svc)
    if not keep_model and not diags:
        return Unit.of(policy.key, claims, fragments)
    if not keep_spans:
        svc = replace(svc, spans=SpanMap())
    return Unit.of(policy.key, claims, fragments, tuple(diags), svc)


class EnvLayers:
    """An environment's overlay layers and endpoint entries, with their spans (each service's
    own entries' spans read only for the services that ask)."""

    def __init__(self, env_file: EnvironmentFile):
        spec = env_file.spec
        self.defaults = Layer(spec["defaults"], env_file.head_spans.under(("defaults",))) if "defaults" in spec else None
        self.tcp_defaults = _without_http_only(self.defaults) if self.defaults else None  # `defaults` for TCP-only services
        # ... and for services outside the mesh, which take none of what `check._NOT_EXTERNAL` lists
        self.external_defaults = (Layer(_drop_paths(self.defaults.data, [(f,) for f in check.NOT_EXTERNAL]), self.defaults.spans)
                                  if self.defaults else None)
        self._file = env_file

    def override(self, key: str) -> Layer | None:
        data = self._file.spec.get("overrides", {}).get(key)
        return None if data is None else Layer(data, self._file.entry_spans("overrides", key))

    def endpoints(self, key: str) -> tuple[object, SpanMap | None]:
        data = self._file.spec.get("endpoints", {}).get(key)
        return (None, None) if data is None else (data, self._file.entry_spans("endpoints", key))


def service(ctx: EnvContext, policy: Policy, diags: Diagnostics) -> m.Service | None:
    """The service's model in `ctx`: overlays merged, validated, built and checked (None on error)."""
    env, layers = ctx.env, ctx.layers
    override = layers.override(policy.key)
    ports = override.data.get("ports") if override and override.data.get("ports") else policy.layer.data["ports"]
    external = (override.data if override and "external" in override.data else policy.layer.data).get("external")
    defaults = layers.external_defaults if external else layers.defaults if _has_http_port(ports) else layers.tcp_defaults
    eff = effective(defaults, policy.layer, override)
    # The policy's spec is valid on its own; only the keys an overlay touched can have gone wrong.
    touched = set(defaults.data if defaults else ()) | set(override.data if override else ())
    if not schema.validate(eff.spec, schema.SPEC, eff.spans, diags, note=overlay_note(eff), only=touched):
        return None
    errors = diags.error_count
    raw_endpoints, endpoint_spans = layers.endpoints(policy.key)
    svc = build.service(policy.metadata, eff.spec, eff.spans, env, build.endpoints(raw_endpoints), diags)
    check.service(svc, diags)
    if raw_endpoints is not None:
        check_endpoints(svc, raw_endpoints, endpoint_spans, diags)
    return svc if diags.error_count == errors else None


def _has_http_port(ports: list[dict]) -> bool:
    return any(p.get("protocol", m.Protocol.HTTP) not in (m.Protocol.TCP, m.Protocol.TLS) for p in ports)


def _without_http_only(defaults: Layer) -> Layer:
    """`defaults` as a TCP-only service inherits them: without what `check.HTTP_ONLY` forbids
    there (a policy of its own setting those is an error; a default is simply not for it)."""
    paths = [rule.path for rule in check.HTTP_ONLY if rule.applies_to_spec(defaults.data)]
    return Layer(_drop_paths(defaults.data, paths), defaults.spans)


def _drop_paths(data: dict, paths) -> dict:
    out = dict(data)
    for path in paths:
        node = out
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                break
            node[key] = node = dict(node[key])
        else:
            node.pop(path[-1], None)
    return out
