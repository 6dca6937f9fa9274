"""The semantic diff of a policy change: what it does to every environment.

`compare(base, head)` takes the two sides (their source files and compile
results) and returns a `Report`: a traffic-terms summary per service, the
resource changes per environment, and warnings a reviewer must not miss.
Pure: no git, no files; `meshc diff` reads the sides and renders the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Mapping

from compiler.diagnostics import Diagnostic, Diagnostics
from compiler.gitops import summary
from compiler.gitops.resources import Change, ResourceChange, diff_outputs, references
from compiler.load import Source, parse


@dataclass(frozen=True)
class Side:
    """One revision: a label for people, its source files and its CompileResult."""

    label: str
    files: Mapping[str, bytes]
    result: object  # compiler.pipeline.CompileResult (diagnostics, ok, outputs, meshes)


@dataclass(frozen=True)
class Line:
    """One summary line or warning: `envs · service: text` (envs or service may be empty).

    The same change in several environments is one line naming them all.
    """

    envs: tuple[str, ...]
    service: str
    text: str
    code: str = ""  # warnings only: canary-step | timeout-shortened | fault-in-prod | version-referenced | no-effect

    def __str__(self) -> str:
        where = " · ".join(x for x in (", ".join(self.envs), self.service) if x)
        return f"{where}: {self.text}" if where else self.text


def _line(env: str, service: str, text: str, code: str = "") -> Line:
    return Line((env,) if env else (), service, text, code)


def _grouped(lines: list[Line]) -> tuple[Line, ...]:
    """Lines equal but for the environment, merged into one, in first-seen order."""
    merged: dict[tuple, list[str]] = {}
    for line in lines:
        merged.setdefault((line.service, line.text, line.code), []).extend(line.envs)
    return tuple(Line(tuple(envs), service, text, code) for (service, text, code), envs in merged.items())


@dataclass(frozen=True)
class EnvDiff:
    name: str
    change: Change | None  # None: this environment renders exactly as before
    istio: tuple[ResourceChange, ...] = ()
    envoy: tuple[ResourceChange, ...] = ()


@dataclass(frozen=True)
class Report:
    base: str
    head: str
    summary: tuple[Line, ...] = ()
    warnings: tuple[Line, ...] = ()
    environments: tuple[EnvDiff, ...] = ()
    base_errors: tuple[Diagnostic, ...] = ()  # set when the base does not compile
    head_errors: tuple[Diagnostic, ...] = ()  # set when the head does not compile
    changed_inputs: tuple[str, ...] = field(default=())  # source files that differ

    @property
    def failed(self) -> bool:
        return bool(self.base_errors or self.head_errors)

    @property
    def changed(self) -> bool:
        return any(e.change is not None for e in self.environments)


def compare(base: Side, head: Side) -> Report:
    changed_inputs = tuple(sorted(p for p in base.files.keys() | head.files.keys()
                                  if base.files.get(p) != head.files.get(p)))
    if not (base.result.ok and head.result.ok):
        return Report(base.label, head.label, changed_inputs=changed_inputs,
                      base_errors=_errors(base.result), head_errors=_errors(head.result))
    lines, warnings, envs = [], [], []
    for env in sorted(base.result.outputs.keys() | head.result.outputs.keys()):
        env_diff = _environment(env, base.result.outputs.get(env), head.result.outputs.get(env))
        envs.append(env_diff)
        old_mesh, new_mesh = base.result.meshes.get(env), head.result.meshes.get(env)
        if env_diff.change is Change.ADDED:
            lines.append(_line(env, "", "new environment"))
        elif env_diff.change is Change.REMOVED:
            lines.append(_line(env, "", "environment removed"))
        elif old_mesh is not None and new_mesh is not None:
            env_lines, env_warnings = _services(env, old_mesh, new_mesh, head.result.outputs[env])
            lines += env_lines
            warnings += env_warnings
    warnings += _no_effect(base, head, changed_inputs, {e.name: e for e in envs})
    return Report(base.label, head.label, _grouped(lines), _grouped(warnings), tuple(envs), changed_inputs=changed_inputs)


def _errors(result) -> tuple[Diagnostic, ...]:
    return tuple(d for d in result.diagnostics if d.is_error)


def _environment(name: str, old: Mapping[str, bytes] | None, new: Mapping[str, bytes] | None) -> EnvDiff:
    istio, envoy = diff_outputs(old or {}, new or {})
    if old is None:
        return EnvDiff(name, Change.ADDED, tuple(istio), tuple(envoy))
    if new is None:
        return EnvDiff(name, Change.REMOVED, tuple(istio), tuple(envoy))
    if old == new:
        return EnvDiff(name, None)
    return EnvDiff(name, Change.MODIFIED, tuple(istio), tuple(envoy))


def _services(env: str, old_mesh, new_mesh, new_files: Mapping[str, bytes]) -> tuple[list[Line], list[Line]]:
    old = {s.key: s for s in old_mesh.services}
    new = {s.key: s for s in new_mesh.services}
    lines, warnings = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a is None:
            lines.append(_line(env, key, "new service"))
        elif b is None:
            lines.append(_line(env, key, "service removed"))
        elif a != b:
            lines += [_line(env, key, text) for text in summary.service_changes(a, b)]
            warnings += [_line(env, key, text, code) for code, text in summary.service_warnings(a, b, env)]
            warnings += _removed_still_referenced(env, a, b, new_files)
    return lines, warnings


def _removed_still_referenced(env: str, old, new, new_files: Mapping[str, bytes]) -> list[Line]:
    gone = sorted({v.name for v in old.versions} - {v.name for v in new.versions})
    out = []
    for version in gone:
        where = references(new_files, new.fqdn, version)
        if where:
            out.append(_line(env, new.key, f"version {version} is removed but still referenced in "
                                          f"{', '.join(where)}: those routes will fail", "version-referenced"))
    return out


def _no_effect(base: Side, head: Side, changed: tuple[str, ...], envs: dict[str, EnvDiff]) -> list[Line]:
    """Changed inputs that change no output where they were meant to."""
    env_files = {p: PurePosixPath(p).stem for s in (base, head) for p in Source(s.files).environment_paths()}
    warnings = []
    for path in changed:
        if path in env_files:
            env = env_files[path]  # the pipeline holds every environment to its file's name
            if env in envs and envs[env].change is None:
                warnings.append(_line(env, "", f"{path} changed but rendered/{env} does not", "no-effect"))
            continue
        key = _policy_key(path, head.files.get(path) or base.files.get(path))
        if key is None:
            continue
        unchanged = [e for e in sorted(head.result.meshes)
                     if e in base.result.meshes and _service(base, e, key) == _service(head, e, key)
                     and _service(head, e, key) is not None]
        if len(unchanged) == len(head.result.meshes) and unchanged:
            warnings.append(_line("", key, f"{path} changed but no environment renders it differently", "no-effect"))
            continue
        for env in unchanged:
            pinned = _override_file(head, env, key)
            hint = f" (an override in {pinned} pins it)" if pinned else ""
            warnings.append(_line(env, key, f"the change to {path} has no effect here{hint}", "no-effect"))
    return warnings


def _service(side: Side, env: str, key: str):
    mesh = side.result.meshes.get(env)
    return mesh.service(key) if mesh is not None else None


# The inputs are read with the compiler's own loader (YAML 1.2, as compiled),
# never re-parsed another way: both sides compiled, so these files are valid.

def _policy_key(path: str, data: bytes | None) -> str | None:
    """`namespace/name` of the policy file at `path`; None when it is not a valid policy."""
    meta = _mapping(_document(path, data), "metadata")
    if meta.get("namespace") and meta.get("name"):
        return f"{meta['namespace']}/{meta['name']}"
    return None


def _override_file(side: Side, env: str, key: str) -> str | None:
    """The path of `env`'s file when its `spec.overrides` names policy `key`."""
    for path in Source(side.files).environment_paths():
        if PurePosixPath(path).stem == env and key in _mapping(_mapping(_document(path, side.files[path]), "spec"), "overrides"):
            return path
    return None


def _document(path: str, data: bytes | None):
    doc = parse(path, data, Diagnostics()) if data is not None else None
    return doc.data if doc is not None else None


def _mapping(value, key: str) -> dict:
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}
