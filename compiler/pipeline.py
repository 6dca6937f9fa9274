"""The pipeline: load → validate → merge overlays → model → check → lower → emit.

`compile_source` runs the stages in order over a `Source` and stops after any
stage that reported an error. Environments are independent once the inputs
are loaded, so a large repo compiles them in parallel worker processes.
Nothing here touches the file system; the CLI writes what it returns.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import PurePosixPath
from typing import Sequence

from compiler import build, check, schema
from compiler import model as m
from compiler.diagnostics import Diagnostic, Diagnostics, Note, SpanMap, sorted_unique
from compiler.emit import serialize
from compiler.load import Document, Source, parse
from compiler.overlay import Layer, effective, overlay_note
from compiler.targets import registry

# Below this many service×environment pairs, worker processes cost more than they save.
PARALLEL_THRESHOLD = 400


@dataclass(frozen=True)
class Policy:
    """A loaded, schema-valid policy file."""

    doc: Document

    @property
    def key(self) -> str:
        meta = self.doc.data["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    @property
    def has_http_port(self) -> bool:
        return any(p.get("protocol", "HTTP") != "TCP" for p in self.doc.data["spec"]["ports"])

    def layer(self) -> Layer:
        return Layer(self.doc.data["spec"], self.doc.spans.under(("spec",)))


@dataclass(frozen=True)
class EnvironmentFile:
    """A loaded, schema-valid environment file."""

    name: str
    doc: Document

    @property
    def spec(self) -> dict:
        return self.doc.data["spec"]

    @property
    def spans(self) -> SpanMap:
        return self.doc.spans.under(("spec",))


@dataclass
class CompileResult:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    outputs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # env → rendered/<env>/ path → bytes
    meshes: dict[str, m.Mesh] = field(default_factory=dict)
    environments: tuple[str, ...] = ()  # every environment the source defines

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


class UnknownEnvironment(ValueError):
    """`--env` named an environment that has no file: a usage error."""


def compile_source(source: Source, envs: Sequence[str] | None = None, jobs: int | None = None) -> CompileResult:
    """Compile every environment (or those in `envs`) of `source`.

    Raises `UnknownEnvironment` when `envs` names one that does not exist.
    Diagnostics come back sorted by file and line, each once.
    """
    diags = Diagnostics()
    policies = load_policies(source, diags)
    environments = load_environments(source, diags)
    result = CompileResult(environments=tuple(sorted(e.name for e in environments)))
    if envs:
        unknown = sorted(set(envs) - set(result.environments))
        if unknown:
            have = ", ".join(result.environments) or "none"
            raise UnknownEnvironment(f"no environment named {', '.join(unknown)} (environments: {have})")
        environments = [e for e in environments if e.name in envs]
    if diags.has_errors:
        result.diagnostics = sorted_unique(diags)
        return result
    for name, mesh, files, env_diags in _run(environments, policies, jobs):
        diags.extend(env_diags)
        if mesh is not None:
            result.meshes[name] = mesh
            result.outputs[name] = files
    result.diagnostics = sorted_unique(diags)
    if not result.ok:
        result.outputs = {}
    return result


# -- load and validate ---------------------------------------------------------------------


def load_policies(source: Source, diags: Diagnostics) -> list[Policy]:
    """Parse and schema-check every policy; report duplicates. Sorted by key."""
    policies: dict[str, Policy] = {}
    for path in source.policy_paths():
        doc = parse(path, source.files[path], diags)
        if doc is None or not _validate_top(doc, schema.POLICY, diags):
            continue
        policy = Policy(doc)
        first = policies.get(policy.key)
        if first is not None:
            diags.error(
                "policy.duplicate",
                f"a second policy for {policy.key}",
                doc.spans.at(("metadata", "name")),
                Note(f"the first policy for {policy.key}", first.doc.spans.at(("metadata", "name"))),
            )
            continue
        policies[policy.key] = policy
    return [policies[k] for k in sorted(policies)]


def load_environments(source: Source, diags: Diagnostics) -> list[EnvironmentFile]:
    out = []
    for path in source.environment_paths():
        doc = parse(path, source.files[path], diags)
        if doc is None or not _validate_top(doc, schema.ENVIRONMENT, diags):
            continue
        stem = PurePosixPath(path).stem
        name = doc.data["metadata"]["name"]
        if name != stem:
            diags.error("environment.name", f"environment {name!r} must live in environments/{name}.yaml, not {path}", doc.spans.at(("metadata", "name")))
            continue
        out.append(EnvironmentFile(name, doc))
    return out


def _validate_top(doc: Document, top_schema: dict, diags: Diagnostics) -> bool:
    if not isinstance(doc.data, dict):
        diags.error("schema.type", "expected a mapping with apiVersion, kind, metadata and spec", doc.spans.at(()))
        return False
    return schema.validate(doc.data, top_schema, doc.spans, diags)


# -- one environment ------------------------------------------------------------------------


def _run(environments: list[EnvironmentFile], policies: list[Policy], jobs: int | None):
    work = len(environments) * len(policies)
    jobs = jobs if jobs is not None else min(len(environments), os.cpu_count() or 1)
    if jobs <= 1 or len(environments) <= 1 or work < PARALLEL_THRESHOLD:
        return [compile_environment(e, policies) for e in environments]
    global _POLICIES
    _POLICIES = policies  # inherited by the forked workers: no pickling of the inputs
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
            return list(pool.map(_compile_in_worker, environments))
    finally:
        _POLICIES = None


_POLICIES: list[Policy] | None = None


def _compile_in_worker(env: EnvironmentFile):
    return compile_environment(env, _POLICIES)


def compile_environment(env_file: EnvironmentFile, policies: list[Policy]):
    """One environment: overlays, model, checks, targets. → (name, mesh | None, files, diagnostics)."""
    diags = Diagnostics()
    spec, spans = env_file.spec, env_file.spans
    env = build.environment(env_file.name, spec, spans)
    known = {p.key: p for p in policies}
    _check_keys(spec, spans, known, diags)
    defaults = Layer(spec["defaults"], spans.under(("defaults",))) if "defaults" in spec else None
    overrides = spec.get("overrides", {})
    services = []
    for policy in policies:
        layer_defaults = defaults if defaults is None or policy.has_http_port else _without_http_only(defaults)
        override = Layer(overrides[policy.key], spans.under(("overrides", policy.key))) if policy.key in overrides else None
        svc = _service(env, policy, layer_defaults, override, spec.get("endpoints", {}), spans, diags)
        if svc is not None:
            services.append(svc)
    check.ingress_hosts(tuple(services), env.name, diags)
    if diags.has_errors:
        return env.name, None, {}, list(diags)
    mesh = m.Mesh(env, tuple(services))
    files: dict[str, bytes] = {}
    for target in registry():
        lowered = target.lower(mesh)
        diags.extend(lowered.diagnostics)
        for f in lowered.files:
            files[f.path] = serialize(f)
    if diags.has_errors:
        return env.name, None, {}, list(diags)
    return env.name, mesh, dict(sorted(files.items())), list(diags)


def _service(env, policy: Policy, defaults, override, endpoints: dict, env_spans: SpanMap, diags: Diagnostics) -> m.Service | None:
    eff = effective(defaults, policy.layer(), override)
    if not schema.validate(eff.spec, schema.SPEC, eff.spans, diags, note=overlay_note(eff)):
        return None
    errors = diags.error_count
    raw_endpoints = endpoints.get(policy.key)
    svc = build.service(policy.doc.data["metadata"], eff.spec, eff.spans, env, build.endpoints(raw_endpoints), diags)
    check.service(svc, diags)
    if raw_endpoints is not None:
        _check_endpoints(svc, raw_endpoints, env_spans.under(("endpoints", policy.key)), diags)
    return svc if diags.error_count == errors else None


# Environment defaults that only mean something for HTTP; a TCP-only service does not inherit them.
HTTP_ONLY_DEFAULTS = ("timeout", "retries")


def _without_http_only(defaults: Layer) -> Layer:
    data = {k: v for k, v in defaults.data.items() if k not in HTTP_ONLY_DEFAULTS}
    return Layer(data, defaults.spans)


def _check_keys(spec: dict, spans: SpanMap, known: dict, diags: Diagnostics) -> None:
    """Override and endpoint keys must name a policy."""
    for section in ("overrides", "endpoints"):
        for key in spec.get(section, {}):
            if key not in known:
                message = f"{section}: no policy is {key}{check.suggest(key, sorted(known))}"
                diags.error(f"{section}.unknown-service", message, spans.key_at((section, key)))


def _check_endpoints(svc: m.Service, raw, spans: SpanMap, diags: Diagnostics) -> None:
    if isinstance(raw, list):
        if svc.versions:
            names = ", ".join(v.name for v in svc.versions)
            diags.error("endpoints.versions", f"{svc.key} has versions ({names}): give its endpoints per version", spans.at(()))
        return
    if not svc.versions:
        diags.error("endpoints.versions", f"{svc.key} has no versions: give its endpoints as a list", spans.at(()))
        return
    for version in raw:
        if svc.version(version) is None:
            diags.error("endpoints.unknown-version", f"{svc.key} has no version {version!r}", spans.key_at((version,)))
