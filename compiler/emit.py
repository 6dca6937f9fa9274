"""Emission: the one YAML and one JSON serializer, and atomic writes of `rendered/`.

YAML goes through libyaml's C emitter (PyYAML's CSafeDumper): sorted keys,
block style, LF, a final newline. PyYAML resolves scalars by YAML 1.1, so
strings such as "on" or "yes" come out quoted and Kubernetes (also 1.1)
reads them back as strings. JSON is `json.dumps` with sorted keys, two-space
indent and a final newline.

`write_rendered` builds each environment's directory beside the old one and
swaps it in with renames, so a reader never sees half a directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import yaml

from compiler.targets import OutputFile



class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """libyaml's emitter, never writing anchors: a reviewer reads every value where it applies."""

    def ignore_aliases(self, data) -> bool:
        return True

KUSTOMIZATION = "kustomization.yaml"


def serialize(file: OutputFile) -> bytes:
    if file.format == "yaml":
        return yaml_bytes(file.content)
    if file.format == "json":
        return json_bytes(file.content)
    raise ValueError(f"unknown output format {file.format!r}")


def yaml_bytes(documents: list) -> bytes:
    text = yaml.dump_all(documents, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16)
    return text.encode("utf-8")


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


Outputs = Mapping[str, Mapping[str, bytes]]  # environment → (path inside rendered/<env>/ → bytes)


def write_rendered(out_dir: Path, outputs: Outputs, prune: bool = False) -> None:
    """Replace `out_dir/<env>` for each environment in `outputs`, each as a whole.

    With `prune`, environment directories that are no longer compiled (they
    hold a kustomization.yaml and are not in `outputs`) are removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for env, files in outputs.items():
        _replace_dir(out_dir / env, files)
    if prune:
        for stale in _env_dirs(out_dir) - set(outputs):
            shutil.rmtree(out_dir / stale)


def _replace_dir(target: Path, files: Mapping[str, bytes]) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        made: set[Path] = set()
        for rel, content in files.items():
            path = staging / rel
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            path.write_bytes(content)
        for d in [staging, *made]:
            os.chmod(d, 0o755)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def _env_dirs(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / KUSTOMIZATION).is_file()}


def stale_files(out_dir: Path, outputs: Outputs, all_envs: bool) -> list[str]:
    """What differs between `out_dir` and `outputs`, as `rendered/...: reason` lines (empty when current)."""
    out_dir = Path(out_dir)
    problems = []
    for env, files in sorted(outputs.items()):
        on_disk = _read_tree(out_dir / env)
        for rel in sorted(set(files) | set(on_disk)):
            shown = f"{out_dir.name}/{env}/{rel}"
            if rel not in on_disk:
                problems.append(f"{shown}: missing")
            elif rel not in files:
                problems.append(f"{shown}: not produced by the compiler (stale)")
            elif on_disk[rel] != files[rel]:
                problems.append(f"{shown}: differs from the compiled output")
    if all_envs:
        for env in sorted(_env_dirs(out_dir) - set(outputs)):
            problems.append(f"{out_dir.name}/{env}/: no environment file compiles to it (stale)")
    return problems


def _read_tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out
