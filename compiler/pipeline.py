"""The pipeline: the stages, in order, stopping after any stage that reported an error.

    load → validate          validate.load_inputs     policies and environments, parsed and schema-checked
    merge → model → check    units.compile_units      one service in one environment: overlays merged,
             → lower                                  built, checked, lowered by each target
    check (between services) check.claims             ingress hosts, TCP ports, generated names, mirrors
    emit                     _emit                    each target assembles an environment's files
    publish | serve          (callers: cli, gitops, xds read what this returns)

Nothing here reads or writes files: `compile_source` takes a `Source` and returns
the files, by path, as `emit.Rendered` mappings (bytes, each made when first read). The cache (`Cache`, or `NoCache`) is handed to the two stages
that read it, behind one seam each.
"""

from __future__ import annotations

import gc
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

from compiler import check
from compiler import model as m
from compiler.cache import NoCache
from compiler.diagnostics import Diagnostic, Diagnostics, Note, Severity, Span, sorted_unique
from compiler.emit import Rendered
from compiler.errors import UnknownEnvironment
from compiler.load import Source
from compiler.targets import registry
from compiler.units import EnvContext, Unit, compile_units
from compiler.validate import EnvironmentFile, Policy, load_inputs

__all__ = ["CompileResult", "UnknownEnvironment", "compile_source"]


@dataclass
class CompileResult:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    outputs: dict[str, Rendered] = field(default_factory=dict)  # env → rendered/<env>/ path → bytes
    meshes: dict[str, m.Mesh] = field(default_factory=dict)
    environments: tuple[str, ...] = ()  # every environment the source defines
    services: int = 0  # valid policies

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


def compile_source(source: Source, envs: Sequence[str] | None = None, jobs: int | None = None,
                   cache=None, models: bool = True) -> CompileResult:
    """Compile every environment (or those in `envs`) of `source`.

    Raises `UnknownEnvironment` when `envs` names one that does not exist.
    Diagnostics come back sorted by file and line, each once, the same with a
    cache or without. What this run adds to `cache` is written when the caller
    closes it. `models=False` skips `result.meshes` (the CLI's compile does not
    need them).
    """
    cache = cache if cache is not None else NoCache()
    diags = Diagnostics()
    with _no_gc():
        policies, environments = load_inputs(source, cache, jobs, diags)
        result = CompileResult(environments=tuple(sorted(e.name for e in environments)), services=len(policies))
        environments = _selected(environments, envs, result.environments)
        if not diags.has_errors:
            contexts = [EnvContext.of(e, policies, diags) for e in environments]
            units = compile_units(contexts, policies, cache, jobs, models)
            by_env = {ctx.env.name: [units[(ctx.env.name, p.key)] for p in policies] for ctx in contexts}
            for env_units in by_env.values():
                for unit in env_units:
                    diags.extend(unit.diagnostics)
            diags.extend(_claims_checked(by_env, cache))
            if not diags.has_errors:
                result.outputs = {ctx.env.name: _emit(ctx, by_env[ctx.env.name], diags) for ctx in contexts}
            if models and not diags.has_errors:
                result.meshes = {ctx.env.name: _mesh(ctx, policies, by_env[ctx.env.name]) for ctx in contexts}
    result.diagnostics = sorted_unique(diags)
    if not result.ok:
        result.outputs, result.meshes = {}, {}
    return result


def _selected(environments: list[EnvironmentFile], envs: Sequence[str] | None, every: tuple[str, ...]) -> list[EnvironmentFile]:
    if not envs:
        return environments
    unknown = sorted(set(envs) - set(every))
    if unknown:
        raise UnknownEnvironment(f"no environment named {', '.join(unknown)} (environments: {', '.join(every) or 'none'})")
    return [e for e in environments if e.name in envs]


def _claims_checked(by_env: dict[str, list[Unit]], cache) -> list[Diagnostic]:
    """What `check.claims` finds between the services of each environment. A pure function of
    the units' claims, so it is looked up by their JSON (`cache.value`): a change that leaves
    every claim as it was (a weight, a timeout) reads none of them back into `check.Claims`."""
    if any(u.failed for us in by_env.values() for u in us):  # what a failed unit claims is unknown
        return _claims_found(by_env)
    digest = hashlib.sha256()
    for env, units in by_env.items():
        digest.update(b"%d %s\n" % (len(units), env.encode()))
        digest.update("\n".join(u.claims_json for u in units).encode())
    found = cache.value(b"claims:" + digest.digest(), lambda: [_diagnostic_json(d) for d in _claims_found(by_env)])
    return [_diagnostic(d) for d in found]


def _claims_found(by_env: dict[str, list[Unit]]) -> list[Diagnostic]:
    found = Diagnostics()
    check.claims({env: [u.claims for u in us] for env, us in by_env.items()}, found)
    return list(found)


def _diagnostic_json(d: Diagnostic) -> list:
    return [d.code, d.message, _span_json(d.span), d.severity.value, [[n.message, _span_json(n.span)] for n in d.notes]]


def _diagnostic(value: list) -> Diagnostic:
    code, message, span, severity, notes = value
    return Diagnostic(code, message, _span(span), Severity(severity), tuple(Note(text, _span(at)) for text, at in notes))


def _span_json(span: Span | None) -> list | None:
    return None if span is None else list(span)


def _span(value: list | None) -> Span | None:
    return None if value is None else Span(*value)


def _emit(ctx: EnvContext, units: list[Unit], diags: Diagnostics) -> Rendered:
    """The environment's files, by path, from its units (in mesh order): each target's assembly,
    each file serialised when first read (a write that knows it unchanged never does)."""
    fragments = [u.fragments for u in units if u.fragments]
    files = {}
    for target in registry():
        lowered = target.assemble(ctx.env, [f[target.NAME] for f in fragments])
        diags.extend(lowered.diagnostics)
        for f in lowered.files:
            files[f.path] = f
    return Rendered(files)


def _mesh(ctx: EnvContext, policies: list[Policy], units: list[Unit]) -> m.Mesh:
    """The environment's model, for callers that read it (`meshc diff`)."""
    services = (unit.model(ctx, policy) for policy, unit in zip(policies, units) if unit.fragments)
    return m.Mesh(ctx.env, tuple(s for s in services if s is not None))


@contextmanager
def _no_gc():
    """Compiling allocates millions of short-lived, acyclic values; the cyclic
    collector only slows that down (~2× on lowering, 3× on loading the cache)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
