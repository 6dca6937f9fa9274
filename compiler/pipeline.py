"""The pipeline: load → validate → merge overlays → model → check → lower → emit.

`compile_source` runs the stages in order over a `Source` and stops after any
stage that reported an error. The unit of work is one service in one
environment (overlay, model, checks, each target's per-service fragment);
environment-wide work (cross-service checks, assembling each target's files)
follows. Units are independent, so a large repo computes them in forked
worker processes (and parses its new policy files in others, while the
environments load), and a `Cache` lets a re-compile skip every unit whose
policy and environment files did not change: a unit's resources come back
from it as serialised pieces, spliced into the files as they are. Nothing
here writes files.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import PurePosixPath
from typing import Callable, Sequence

import orjson

from compiler import build, check, schema
from compiler import model as m
from compiler.cache import Cache, file_key, pack_record, unit_key
from compiler.diagnostics import Diagnostic, Diagnostics, Note, Span, SpanMap, sorted_unique
from compiler.emit import file_bytes
from compiler.load import Document, Source, parse
from compiler.overlay import Layer, effective, overlay_note, policy_note
from compiler.targets import registry

# Below this many units to compute (policy files to parse), worker processes cost more than they save.
PARALLEL_THRESHOLD = 400
PARSE_THRESHOLD = 200
CHUNKS_PER_WORKER = 4


@dataclass
class Policy:
    """A schema-valid policy file. `doc` is parsed on demand when the cache knew the file."""

    path: str
    content: bytes
    key: str  # namespace/name
    name_span: Span
    file_key: bytes
    doc: Document | None = None

    def document(self) -> Document:
        if self.doc is None:
            self.doc = parse(self.path, self.content, Diagnostics())
        return self.doc

    @cached_property
    def layer(self) -> Layer:
        doc = self.document()
        return Layer(doc.data["spec"], doc.spans.under(("spec",)))

    @property
    def metadata(self) -> dict:
        return self.document().data["metadata"]


@dataclass(frozen=True)
class EnvironmentFile:
    """A loaded, schema-valid environment file."""

    name: str
    doc: Document
    file_key: bytes

    @property
    def spec(self) -> dict:
        return self.doc.data["spec"]

    @cached_property
    def spans(self) -> SpanMap:
        return self.doc.spans.under(("spec",))


@dataclass
class CompileResult:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    outputs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # env → rendered/<env>/ path → bytes
    meshes: dict[str, m.Mesh] = field(default_factory=dict)
    environments: tuple[str, ...] = ()  # every environment the source defines
    services: int = 0  # valid policies

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


class UnknownEnvironment(ValueError):
    """`--env` named an environment that has no file: a usage error."""


@dataclass(frozen=True)
class Unit:
    """One service in one environment, compiled: each target's fragment.

    `service` is the model when this run built it and something needs it;
    None when the unit came from the cache (which stores only clean units, as
    JSON and pieces), or when no model is wanted (a clean unit, `models=False`).
    """

    key: str
    service: m.Service | None
    ingress_hosts: tuple[str, ...]
    fragments: dict  # target NAME → what its `lower_service` returned (JSON-able, with pieces)
    diagnostics: tuple[Diagnostic, ...] = ()

    def to_json(self) -> dict:
        return {"ingress_hosts": list(self.ingress_hosts), "fragments": self.fragments}

    @classmethod
    def from_json(cls, key: str, value: dict) -> "Unit":
        return cls(key, None, tuple(value["ingress_hosts"]), value["fragments"])


def compile_source(
    source: Source,
    envs: Sequence[str] | None = None,
    jobs: int | None = None,
    cache: Cache | None = None,
    models: bool = True,
) -> CompileResult:
    """Compile every environment (or those in `envs`) of `source`.

    Raises `UnknownEnvironment` when `envs` names one that does not exist.
    Diagnostics come back sorted by file and line, each once. Any error is
    reported from a run without the cache, so a cache never shapes a message.
    What this run adds to `cache` is written when the caller closes it.
    `models=False` skips `result.meshes` (the CLI's compile does not need them).
    """
    with _no_gc():
        result = _compile(source, envs, jobs, cache, models)
        if cache is not None and not result.ok:
            result = _compile(source, envs, jobs, None, models)
    return result


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


def _compile(source: Source, envs: Sequence[str] | None, jobs: int | None, cache: Cache | None, models: bool) -> CompileResult:
    diags = Diagnostics()
    loading = _PolicyLoad(source, cache, jobs)  # new policy files parse in worker processes meanwhile
    try:
        environments = load_environments(source, diags, loading.by_key if cache is None else None, cache)
        policies = loading.policies(diags)
    finally:
        loading.close()  # whatever happened meanwhile, no worker outlives this
    result = CompileResult(environments=tuple(sorted(e.name for e in environments)), services=len(policies))
    if envs:
        unknown = sorted(set(envs) - set(result.environments))
        if unknown:
            have = ", ".join(result.environments) or "none"
            raise UnknownEnvironment(f"no environment named {', '.join(unknown)} (environments: {have})")
        environments = [e for e in environments if e.name in envs]
    if diags.has_errors:
        result.diagnostics = sorted_unique(diags)
        return result
    contexts = [_EnvContext.of(e, policies, diags) for e in environments]
    units = _units(contexts, policies, jobs, cache, models)
    for ctx in contexts:
        files = _assemble(ctx, [units[(ctx.env.name, p.key)] for p in policies], diags)
        if files is not None:
            result.outputs[ctx.env.name] = files
            if models:
                result.meshes[ctx.env.name] = _mesh(ctx, policies, units)
    result.diagnostics = sorted_unique(diags)
    if not result.ok:
        result.outputs = {}
    return result


# -- load and validate ---------------------------------------------------------------------


class _PolicyLoad:
    """Loading every policy file, begun at construction and finished by `policies`.

    A file the cache has seen valid is not parsed at all. When many are new,
    worker processes parse and schema-check them while the caller goes on (to
    load the environments); each sends back its documents as JSON with span
    rows, which the caller turns into spans only where a unit reads them.
    """

    def __init__(self, source: Source, cache: Cache | None, jobs: int | None):
        self._cache = cache
        self._files: list[tuple[str, bytes, bytes, list | None]] = []  # path, content, file key, cached [key, span]
        for path in source.policy_paths():
            content = source.files[path]
            fkey = file_key(path, content)
            self._files.append((path, content, fkey, cache.get_json(b"policy:" + fkey) if cache else None))
        new = [(path, content) for path, content, _, known in self._files if known is None]
        jobs = jobs if jobs is not None else (os.cpu_count() or 1)
        self._pool, self._parts, self._home = None, [], new
        if jobs > 1 and len(new) >= PARSE_THRESHOLD:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            # The caller parses a share itself once its environments are loaded, so it is not
            # left waiting (and that share needs no trip through JSON).
            home = len(new) // (3 * jobs)
            self._home, away = new[:home], new[home:]
            self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork"))
            self._parts = [self._pool.submit(_parse_policies, away[i::jobs]) for i in range(jobs)]
        self._result: list[Policy] | None = None
        self._diags: list[Diagnostic] = []

    def policies(self, diags: Diagnostics) -> list[Policy]:
        if self._result is None:
            self._result = self._finish()
        diags.extend(self._diags)
        self._diags = []
        return self._result

    def by_key(self) -> dict[str, Policy]:
        if self._result is None:
            self._result = self._finish()
        return {p.key: p for p in self._result}

    def close(self) -> None:
        """Stop the workers (at once, when `policies` was never reached)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _finish(self) -> list[Policy]:
        parsed: dict[str, tuple] = {}
        try:
            docs, problems = _parse_policies(self._home, as_json=False)
            self._diags += problems
            for path, doc, name_span in docs:
                parsed[path] = (doc, Span(*name_span))
            for part in self._parts:
                docs, problems = part.result()
                self._diags += problems
                for path, doc, name_span in orjson.loads(docs):
                    parsed[path] = (Document.from_json(doc), Span(*name_span))
        finally:
            self.close()
        policies: dict[str, Policy] = {}
        for path, content, fkey, known in self._files:
            if known is not None:
                policy = Policy(path, content, known[0], Span(*known[1]), fkey)
            elif path in parsed:
                doc, name_span = parsed[path]
                meta = doc.data["metadata"]
                policy = Policy(path, content, f"{meta['namespace']}/{meta['name']}", name_span, fkey, doc)
                if self._cache:
                    self._cache.put_json(b"policy:" + fkey, [policy.key, list(policy.name_span)])
            else:
                continue  # invalid: reported
            first = policies.get(policy.key)
            if first is not None:
                self._diags.append(Diagnostic(
                    "policy.duplicate",
                    f"a second policy for {policy.key}",
                    policy.name_span,
                    notes=(Note(f"the first policy for {policy.key}", first.name_span),),
                ))
                continue
            policies[policy.key] = policy
        return [policies[k] for k in sorted(policies)]


def _parse_policies(files: list[tuple[str, bytes]], as_json: bool = True):
    """Parse and schema-check policy files → ([path, document, name span] for the valid ones, diagnostics).
    In a worker process the documents go back as JSON bytes: ~10× cheaper to send than pickled."""
    diags = Diagnostics()
    valid = []
    for path, content in files:
        doc = parse(path, content, diags)
        if doc is not None and _validate_top(doc, schema.POLICY, diags):
            valid.append([path, doc.to_json() if as_json else doc, list(doc.spans.at(("metadata", "name")))])
    return (orjson.dumps(valid) if as_json else valid), list(diags)


def load_environments(source: Source, diags: Diagnostics, policies: Callable[[], dict[str, Policy]] | None,
                      cache: Cache | None = None) -> list[EnvironmentFile]:
    """Parse and schema-check every environment.

    With `policies` (called only when there is a problem to report), an error
    inside an override carries a note at the policy's line.
    A file the cache has seen valid comes from the cache, parsed.
    """
    out: list[EnvironmentFile] = []
    for path in source.environment_paths():
        fkey = file_key(path, source.files[path])
        known = cache.get_json(b"environment:" + fkey) if cache else None
        doc = Document.from_json(known) if known is not None else None
        if doc is None:
            doc = parse(path, source.files[path], diags)
            if doc is None or not _validate_top(doc, schema.ENVIRONMENT, diags, _override_note(policies) if policies else None):
                continue
            if cache:
                cache.put_json(b"environment:" + fkey, doc.to_json())
        stem = PurePosixPath(path).stem
        name = doc.data["metadata"]["name"]
        if name != stem:
            diags.error("environment.name", f"environment {name!r} must live in environments/{name}.yaml, not {path}", doc.spans.at(("metadata", "name")))
            continue
        first = next((e for e in out if e.name == name), None)
        if first is not None:  # prod.yaml beside prod.yml
            diags.error(
                "environment.duplicate",
                f"a second file for environment {name!r}",
                doc.spans.at(("metadata", "name")),
                Note(f"the first file for {name!r}", first.doc.spans.at(("metadata", "name"))),
            )
            continue
        out.append(EnvironmentFile(name, doc, fkey))
    return out


def _validate_top(doc: Document, top_schema: dict, diags: Diagnostics, note=None) -> bool:
    if not isinstance(doc.data, dict):
        diags.error("schema.type", "expected a mapping with apiVersion, kind, metadata and spec", doc.spans.at(()))
        return False
    return schema.validate(doc.data, top_schema, doc.spans, diags, note)


def _override_note(policies: Callable[[], dict[str, Policy]]):
    """For a problem at spec.overrides[KEY].PATH: a note at the policy's own PATH."""

    def note(path: tuple) -> Note | None:
        if len(path) < 3 or path[:2] != ("spec", "overrides") or path[2] not in policies():
            return None
        return policy_note(policies()[path[2]].layer.spans, tuple(path[3:]))

    return note


# -- units: one service in one environment ---------------------------------------------------


@dataclass(frozen=True)
class _EnvContext:
    """What every unit of one environment reads: its model, its overlay layers."""

    file: EnvironmentFile
    env: m.Environment

    @classmethod
    def of(cls, env_file: EnvironmentFile, policies: list[Policy], diags: Diagnostics) -> "_EnvContext":
        spec, spans = env_file.spec, env_file.spans
        _check_keys(spec, spans, {p.key for p in policies}, diags)
        return cls(env_file, build.environment(env_file.name, spec, spans))

    @cached_property
    def layers(self) -> "_EnvLayers":
        """Split out on first use: a re-compile whose units all come from the cache never needs it."""
        return _EnvLayers(self.file.spec, self.file.spans)


def _units(contexts: list[_EnvContext], policies: list[Policy], jobs: int | None, cache: Cache | None, models: bool) -> dict:
    """Every (environment, policy) unit, from the cache where it holds one."""
    units: dict[tuple[str, str], Unit] = {}
    todo: list[tuple[int, int]] = []
    for ci, ctx in enumerate(contexts):
        for pi, policy in enumerate(policies):
            cached = cache.get_pieces(unit_key(policy.file_key, ctx.file.file_key)) if cache else None
            if cached is not None:
                units[(ctx.env.name, policy.key)] = Unit.from_json(policy.key, cached)
            else:
                todo.append((ci, pi))
    for (ci, pi), (unit, packed) in zip(todo, _compute(contexts, policies, todo, jobs, cache is not None, models)):
        units[(contexts[ci].env.name, policies[pi].key)] = unit
        if packed is not None:
            cache.put_packed(unit_key(policies[pi].file_key, contexts[ci].file.file_key), *packed)
    return units


def _compute(contexts, policies, todo, jobs, pack: bool, models: bool) -> list[tuple[Unit, tuple | None]]:
    """Each (context, policy) unit of `todo`, and with `pack` a clean one's cache record
    (`cache.pack_record`), made where the unit was: in worker processes when there are many."""
    jobs = jobs if jobs is not None else (os.cpu_count() or 1)
    for _, pi in todo:
        policies[pi].document()  # parse in the parent: workers inherit it
    if jobs <= 1 or len(todo) < PARALLEL_THRESHOLD:
        return _compute_items(contexts, policies, todo, pack, models)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    global _WORK
    _WORK = (contexts, policies, pack, models)  # inherited by the forked workers, not pickled
    # A policy's units go to one worker: its Service and DestinationRule, the same in every
    # environment, are then rendered once. Several chunks a worker, handed out as workers
    # finish: the cores of a shared machine do not all run at one speed.
    per_chunk = -(-(max(pi for _, pi in todo) + 1) // (jobs * CHUNKS_PER_WORKER))
    by_chunk: dict[int, list] = {}
    for item in todo:
        by_chunk.setdefault(item[1] // per_chunk, []).append(item)
    chunks = list(by_chunk.values())
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_compute_chunk, chunks))
    finally:
        _WORK = None
    by_item = {}
    for chunk, computed in zip(chunks, results):
        by_item.update(zip(chunk, computed))
    return [by_item[item] for item in todo]


_WORK = None


def _compute_chunk(chunk):
    contexts, policies, pack, models = _WORK
    return _compute_items(contexts, policies, chunk, pack, models)


def _compute_items(contexts, policies, items, pack: bool, models: bool) -> list[tuple[Unit, tuple | None]]:
    out = []
    for ci, pi in items:
        unit = _unit(contexts[ci], policies[pi], keep_spans=not pack, keep_model=models or not pack)
        clean = pack and bool(unit.fragments) and not unit.diagnostics  # the cache keeps clean units only
        out.append((unit, pack_record(unit.to_json()) if clean else None))
    return out


def _unit(ctx: _EnvContext, policy: Policy, keep_spans: bool, keep_model: bool) -> Unit:
    """One unit. Its model is kept (with its spans, or without) only for a caller that reads it:
    what a worker keeps travels back to the parent. A unit with diagnostics keeps its model."""
    diags = Diagnostics()
    svc = _service(ctx.env, policy, ctx.layers, diags)
    if svc is None:
        return Unit(policy.key, None, (), {}, tuple(diags))
    fragments = {target.NAME: target.lower_service(svc, ctx.env) for target in registry()}
    hosts = svc.ingress.hosts if svc.ingress else ()
    if not keep_model and not diags:
        return Unit(policy.key, None, hosts, fragments)
    if not keep_spans:
        svc = replace(svc, spans=SpanMap())
    return Unit(policy.key, svc, hosts, fragments, tuple(diags))


def _assemble(ctx: _EnvContext, units: list[Unit], diags: Diagnostics):
    """The environment's files from its units (in mesh order). → files | None on error."""
    for unit in units:
        diags.extend(unit.diagnostics)
    units = [u for u in units if u.fragments]
    if all(u.service is not None for u in units):
        services = tuple(u.service for u in units)
        check.ingress_hosts(services, ctx.env.name, diags)
        check.generated_names(services, diags)
    elif _ingress_clash(units):
        # Cached units carry no spans; an error makes compile_source re-run uncached for the message.
        diags.error("ingress.conflict", "ingress hosts or names clash", None)
    if diags.has_errors:
        return None
    files: dict[str, bytes] = {}
    errors = diags.error_count
    for target in registry():
        lowered = target.assemble(ctx.env, [u.fragments[target.NAME] for u in units])
        diags.extend(lowered.diagnostics)
        for f in lowered.files:
            files[f.path] = file_bytes(f)
    if diags.error_count > errors:
        return None
    return dict(sorted(files.items()))


def _ingress_clash(units: list[Unit]) -> bool:
    """Whether `check.ingress_hosts` or `check.generated_names` would fail (decided without spans)."""
    hosts = [h for u in units for h in u.ingress_hosts]
    keys = {u.key for u in units}
    return len(hosts) != len(set(hosts)) or any(u.ingress_hosts and f"{u.key}-ingress" in keys for u in units)


def _mesh(ctx: _EnvContext, policies: list[Policy], units: dict) -> m.Mesh:
    """The environment's model. Services the cache supplied are rebuilt through overlay,
    validation, model and checks (no lowering, no emission): ~0.2 ms a service."""
    services = []
    for policy in policies:
        unit = units[(ctx.env.name, policy.key)]
        svc = unit.service or _service(ctx.env, policy, ctx.layers, Diagnostics())
        if svc is not None:
            services.append(svc)
    return m.Mesh(ctx.env, tuple(services))


class _EnvLayers:
    """An environment's overlay layers and endpoint entries, with their spans, split out as
    units ask for them: one service at a time while few ask (a re-compile), all at once after."""

    FEW = 16

    def __init__(self, spec: dict, spans: SpanMap):
        self.defaults = Layer(spec["defaults"], spans.under(("defaults",))) if "defaults" in spec else None
        self.tcp_defaults = _without_http_only(self.defaults) if self.defaults else None  # `defaults` for TCP-only services
        self._spec, self._spans = spec, spans
        self._asked = 0
        self._sections: dict[str, dict] = {}

    def override(self, key: str) -> Layer | None:
        data = self._spec.get("overrides", {}).get(key)
        return None if data is None else Layer(data, self._spans_of("overrides", key))

    def endpoints(self, key: str) -> tuple[object, SpanMap | None]:
        data = self._spec.get("endpoints", {}).get(key)
        return (None, None) if data is None else (data, self._spans_of("endpoints", key))

    def _spans_of(self, section: str, key: str) -> SpanMap:
        self._asked += 1
        if self._asked <= self.FEW:
            return self._spans.under((section, key))
        if section not in self._sections:
            self._sections[section] = self._spans.children((section,))
        return self._sections[section].get(key) or SpanMap()


def _service(env: m.Environment, policy: Policy, layers: _EnvLayers, diags: Diagnostics) -> m.Service | None:
    override = layers.override(policy.key)
    ports = override.data.get("ports") if override and override.data.get("ports") else policy.layer.data["ports"]
    defaults = layers.defaults if _has_http_port(ports) else layers.tcp_defaults
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
        _check_endpoints(svc, raw_endpoints, endpoint_spans, diags)
    return svc if diags.error_count == errors else None


def _has_http_port(ports: list[dict]) -> bool:
    return any(p.get("protocol", m.Protocol.HTTP) != m.Protocol.TCP for p in ports)


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


def _check_keys(spec: dict, spans: SpanMap, known: set[str], diags: Diagnostics) -> None:
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
