"""Load and validate: every input file parsed (`load.parse`) and checked against its schema.

`load_inputs` is the stage: the policies, each once per `namespace/name`, and the
environments, each named after its file. A file the cache has seen valid is not
parsed again. When many policy files are new, worker processes parse and
schema-check them while the caller loads the environments. Also here: the checks
of an environment's keys against the policies (`check_keys`, `check_endpoints`), and of
its freeze windows (`check_freeze`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import PurePosixPath
from typing import Callable

import orjson

from compiler import model as m
from compiler import schema, workers
from compiler.cache import file_key
from compiler.diagnostics import Diagnostic, Diagnostics, Note, Span, SpanMap, did_you_mean
from compiler.load import Document, Source, parse
from compiler.overlay import Layer, policy_note

__all__ = ["EnvironmentFile", "Policy", "PolicyLoad", "check_endpoints", "check_keys", "load_environments",
           "load_inputs"]


def load_inputs(source: Source, cache, jobs: int | None, diags: Diagnostics) -> tuple[list["Policy"], list["EnvironmentFile"]]:
    """Every valid policy (sorted by key) and environment (in file order) of `source`;
    the rest reported into `diags`. `cache` is a `Cache` or `NoCache`."""
    loading = PolicyLoad(source, cache, jobs)  # new policy files parse in worker processes meanwhile
    try:
        environments = load_environments(source, diags, loading.by_key, cache)
        policies = loading.policies(diags)
    finally:
        loading.close()  # whatever happened meanwhile, no worker outlives this
    return policies, environments


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


#: The sections of an environment's spec keyed by service (`namespace/name`): a unit reads
#: its own entry of each, so their spans are kept one entry at a time.
ENTRY_SECTIONS = ("overrides", "endpoints")


@dataclass(frozen=True)
class EnvironmentFile:
    """A loaded, schema-valid environment file.

    Its spans come in two parts: those of each service's entry under
    `overrides` and `endpoints` (`entry_spans`, relative to the entry), which a
    re-compile reads for the few services it computes, and the rest
    (`head_spans`). `spans` has them all, put together when first used (to
    report a problem anywhere in the spec). From the cache, an entry's spans are
    its rows' JSON text until a unit asks for them: a re-compile parses the
    spans of the entries it reads, not of every service in the environment.
    """

    doc: Document  # the data; its spans are the head's
    file_key: bytes
    entries: dict = field(default_factory=dict, compare=False)  # section → key → SpanMap, or its rows as JSON text

    @property
    def name(self) -> str:
        return self.doc.data["metadata"]["name"]

    @property
    def spec(self) -> dict:
        return self.doc.data["spec"]

    @cached_property
    def head_spans(self) -> SpanMap:
        return self.doc.spans.under(("spec",))

    def entry_spans(self, section: str, key: str) -> SpanMap:
        entry = self.entries.get(section, {}).get(key)
        if entry is None:
            return SpanMap()
        return SpanMap.from_rows(lambda: orjson.loads(entry)) if type(entry) is str else entry

    @cached_property
    def spans(self) -> SpanMap:
        def every() -> dict:
            out = dict(self.head_spans.items())
            for section, by_key in self.entries.items():
                for key in by_key:
                    out.update({(section, key, *p): span for p, span in self.entry_spans(section, key).items()})
            return out

        return SpanMap.deferred(every)

    @classmethod
    def parsed(cls, doc: Document, file_key: bytes) -> "EnvironmentFile":
        """From a document just parsed and checked: its spans split, in one pass."""
        spec = doc.data["spec"]
        keyed = {section: spec.get(section) or {} for section in ENTRY_SECTIONS}
        head: dict = {}
        entries: dict = {section: {} for section in ENTRY_SECTIONS}
        for path, span in doc.spans.items():
            if len(path) > 2 and path[0] == "spec" and path[1] in keyed and path[2] in keyed[path[1]]:
                entries[path[1]].setdefault(path[2], {})[path[3:]] = span
            else:
                head[path] = span
        return cls(Document(doc.path, doc.data, SpanMap(head), doc.sha), file_key,
                   {section: {key: SpanMap(spans) for key, spans in by_key.items()} for section, by_key in entries.items()})

    def to_json(self) -> dict:
        """Plain JSON for the cache: the document with the head's spans as rows, and each
        entry's rows (relative to it) as JSON text."""
        value = self.doc.to_json()
        value["entries"] = {section: {key: orjson.dumps([[list(p), *span] for p, span in self.entry_spans(section, key).items()]).decode()
                                      for key in by_key} for section, by_key in self.entries.items()}
        return value

    @classmethod
    def from_json(cls, value: dict, file_key: bytes) -> "EnvironmentFile":
        return cls(Document.from_json(value), file_key, value["entries"])


class PolicyLoad:
    """Loading every policy file, begun at construction and finished by `policies`.

    A file the cache has seen valid is not parsed at all. When many are new,
    worker processes parse and schema-check them while the caller goes on (to
    load the environments); each sends back its documents as JSON with span
    rows, which the caller turns into spans only where a unit reads them.
    """

    def __init__(self, source: Source, cache, jobs: int | None):
        self._cache = cache
        self._files: list[tuple[str, bytes, bytes, list | None]] = []  # path, content, file key, cached [key, span]
        for path in source.policy_paths():
            content = source.files[path]
            fkey = file_key(path, content)
            self._files.append((path, content, fkey, cache.get_json(b"policy:" + fkey)))
        new = [(path, content) for path, content, _, known in self._files if known is None]
        jobs = workers.count(jobs)
        self._pool, self._parts, self._home = None, [], new
        if jobs > 1 and len(new) >= workers.PARSE_THRESHOLD:
            # The caller parses a share itself once its environments are loaded, so it is not
            # left waiting (and that share needs no trip through JSON).
            home = len(new) // (3 * jobs)
            self._home, away = new[:home], new[home:]
            self._pool = workers.Pool(jobs)
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
            self._pool.close()
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


def load_environments(source: Source, diags: Diagnostics, policies: Callable[[], dict[str, Policy]],
                      cache) -> list[EnvironmentFile]:
    """Parse and schema-check every environment.

    `policies` (called only when there is a problem to report) gives an error
    inside an override a note at the policy's line.
    A file the cache has seen valid comes from the cache, parsed.
    """
    out: list[EnvironmentFile] = []
    for path in source.environment_paths():
        fkey = file_key(path, source.files[path])
        known = cache.get_json(b"environment:" + fkey)
        if known is not None:
            env = EnvironmentFile.from_json(known, fkey)
        else:
            doc = parse(path, source.files[path], diags)
            if doc is None or not _validate_top(doc, schema.ENVIRONMENT, diags, _override_note(policies)):
                continue
            if not check_freeze(doc.data["spec"].get("freeze") or [], doc.spans, diags):
                continue
            env = EnvironmentFile.parsed(doc, fkey)
            cache.put_json(b"environment:" + fkey, env.to_json())
        doc, name = env.doc, env.name
        stem = PurePosixPath(path).stem
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
        out.append(env)
    return out


def check_freeze(windows: list[dict], spans: SpanMap, diags: Diagnostics) -> bool:
    """Freeze windows are RFC 3339 instants with their offset, each `to` after its `from`, and
    none overlapping another (a window inside another is the other one's mistake). True if so."""
    ok, parsed = True, []
    for i, window in enumerate(windows):
        bounds = []
        for end in ("from", "to"):
            when = instant(window[end])
            if when is None:
                diags.error("freeze.time", f"{window[end]!r} is not an RFC 3339 time with its offset "
                            "(2026-12-24T00:00:00Z, 2026-12-24T09:00:00+01:00)", spans.at(("spec", "freeze", i, end)))
                ok = False
            bounds.append(when)
        if None in bounds:
            continue
        if bounds[1] <= bounds[0]:
            diags.error("freeze.inverted", "this freeze window ends before it starts", spans.at(("spec", "freeze", i, "to")),
                        Note("it starts here", spans.at(("spec", "freeze", i, "from"))))
            ok = False
            continue
        for j, (start, stop) in parsed:
            if bounds[0] < stop and start < bounds[1]:
                diags.error("freeze.overlap", f"this freeze window overlaps window {j + 1}: make them one",
                            spans.at(("spec", "freeze", i)), Note("the window it overlaps", spans.at(("spec", "freeze", j))))
                ok = False
        parsed.append((i, tuple(bounds)))
    return ok


def instant(text: str):
    """A timezone-aware datetime for an RFC 3339 time (with its offset), else None."""
    if not re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text):
        return None
    try:
        return datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return None


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


def check_keys(spec: dict, spans: SpanMap, known: set[str], diags: Diagnostics) -> None:
    """Override and endpoint keys must name a policy."""
    for section in ("overrides", "endpoints"):
        for key in spec.get(section, {}):
            if key not in known:
                message = f"{section}: no policy is {key}{did_you_mean(key, sorted(known))}"
                diags.error(f"{section}.unknown-service", message, spans.key_at((section, key)))


def check_endpoints(svc: m.Service, raw, spans: SpanMap, diags: Diagnostics) -> None:
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
