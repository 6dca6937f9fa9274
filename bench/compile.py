"""Compile benchmark: a synthetic repo of N services × 3 environments.

Reports, in one run on this machine:
  floor       reading + composing every input with ruamel.yaml's C parser, and
              serialising every output with the same serializers meshc uses
              (PyYAML's C emitter, json) — the work no compiler can skip;
  full        `meshc compile` of the whole repo, cold (no rendered/, empty cache);
  recompile   `meshc compile` again after touching one policy (warm cache);
  noop        `meshc compile` again with nothing changed.

Usage: python bench/compile.py [--services 1000] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from ruamel.yaml import CSafeLoader

ENVS = ("dev", "staging", "prod")


def policy(i: int, rng: random.Random) -> str:
    name, ns = f"svc-{i:04d}", f"team-{i % 25:02d}"
    versions = ["v1", "v2"] + (["v3"] if i % 3 == 0 else [])
    lines = [
        "apiVersion: meshc.dev/v1",
        "kind: TrafficPolicy",
        f"metadata: {{name: {name}, namespace: {ns}}}",
        "spec:",
        f"  selector: {{app: {name}}}",
        "  ports:",
        "    - {name: http, port: 8080, targetPort: 8080, protocol: HTTP}",
        "  versions:",
        *[f"    {v}: {{labels: {{version: {v}}}}}" for v in versions],
    ]
    if i % 4 == 0:
        lines += ["  traffic:", "    split: {v1: 70, v2: 30}"]
    else:
        lines += [
            "  traffic:",
            "    stable: v1",
            f"    canary: {{version: v2, weight: {rng.randint(0, 50)}, match: {{headers: {{x-canary: {{exact: \"on\"}}}}}}}}",
        ]
    lines += [
        f"  timeout: {rng.choice(['2s', '4s', '1500ms'])}",
        "  retries: {attempts: 2, perTryTimeout: 500ms, retryOn: [5xx, connect-failure]}",
        f"  loadBalancer: {rng.choice(['LEAST_REQUEST', 'ROUND_ROBIN'])}",
        "  connectionPool:",
        "    tcp: {maxConnections: 100, connectTimeout: 250ms}",
        "    http: {http1MaxPendingRequests: 64, maxRetries: 3}",
        "  outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}",
        "  tls: {mode: ISTIO_MUTUAL}",
    ]
    if i % 50 == 0:
        lines += ["  ingress:", f"    hosts: [{name}.example.com]"]
    return "\n".join(lines) + "\n"


def environment(env: str, n: int) -> str:
    lines = ["apiVersion: meshc.dev/v1", "kind: Environment", f"metadata: {{name: {env}}}", "spec:"]
    lines += [f"  defaults: {{timeout: {dict(dev='30s', staging='10s', prod='10s')[env]}}}", "  overrides:"]
    for i in range(0, n, 10):
        lines.append(f"    team-{i % 25:02d}/svc-{i:04d}: {{timeout: {dict(dev='9s', staging='5s', prod='3s')[env]}}}")
    lines.append("  endpoints:")
    net = ENVS.index(env)
    for i in range(n):
        a, b = divmod(i, 250)
        lines.append(
            f"    team-{i % 25:02d}/svc-{i:04d}: {{v1: [\"10.{net}.{a}.{b + 1}:8080\"], v2: [\"10.{net + 10}.{a}.{b + 1}:8080\"]"
            + (f", v3: [\"10.{net + 20}.{a}.{b + 1}:8080\"]" if i % 3 == 0 else "")
            + "}"
        )
    return "\n".join(lines) + "\n"


def generate(root: Path, n: int) -> None:
    rng = random.Random(42)
    for i in range(n):
        path = root / "policies" / f"team-{i % 25:02d}" / f"svc-{i:04d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(policy(i, rng))
    (root / "environments").mkdir(parents=True, exist_ok=True)
    for env in ENVS:
        (root / "environments" / f"{env}.yaml").write_text(environment(env, n))


def floor(root: Path) -> float:
    """Load every input and serialise every output with the same libraries, nothing else."""
    inputs = sorted((root / "policies").rglob("*.yaml")) + sorted((root / "environments").glob("*.yaml"))
    yaml_outputs = [list(yaml.load_all(p.read_bytes(), Loader=yaml.CSafeLoader)) for p in sorted((root / "rendered").rglob("*.yaml"))]
    json_outputs = [json.loads(p.read_bytes()) for p in sorted((root / "rendered").rglob("*.json"))]

    class Dumper(yaml.CSafeDumper):
        def ignore_aliases(self, data):
            return True

    start = time.perf_counter()
    for p in inputs:
        loader = CSafeLoader(p.read_text())
        try:
            loader.get_single_node()
        finally:
            loader.dispose()
    for docs in yaml_outputs:
        yaml.dump_all(docs, Dumper=Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16)
    for value in json_outputs:
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return time.perf_counter() - start


def meshc(root: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler", "compile", "--repo", str(root), *args], check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def as_installed() -> None:
    """meshc as installed: its bytecode compiled (as a wheel install does), not compiled
    again by every timed run where PYTHONDONTWRITEBYTECODE is set."""
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "compiler", quiet=1)


def aside(*paths: Path, trash: Path) -> None:
    for path in paths:
        if path.exists():
            path.rename(trash / f"{len(list(trash.iterdir()))}-{path.name}")


def creation_cost(where: Path, n: int) -> float:
    """Seconds to create `n` empty files in a new directory: what this disk charges per file."""
    d = Path(tempfile.mkdtemp(prefix="meshc-bench-files-", dir=where))
    start = time.perf_counter()
    for i in range(n):
        os.close(os.open(d / f"{i}.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elapsed = time.perf_counter() - start
    shutil.rmtree(d)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="generate the repo here and keep it")
    args = ap.parse_args()
    as_installed()
    root = args.keep or Path(tempfile.mkdtemp(prefix="meshc-bench-"))
    cache = root.parent / f"{root.name}.cache"
    trash = Path(tempfile.mkdtemp(prefix="meshc-bench-trash-", dir=root.parent))
    os.environ["MESHC_CACHE_DIR"] = str(cache)  # the meshc processes' re-compile cache, removed for cold runs
    try:
        generate(root, args.services)
        full, recompile, noop, floors = [], [], [], []
        touched = root / "policies" / "team-07" / f"svc-{7:04d}.yaml"
        for _ in range(args.repeat):
            # Cold: no rendered/, no cache. Both are moved aside and deleted after the last run:
            # deleting thousands of files right before one makes the disk's next file creations
            # slow (this VM's ext4 discards freed blocks), which is the set-up's cost, not meshc's.
            aside(root / "rendered", cache, trash=trash)
            full.append(meshc(root))
            floors.append(floor(root))
            text = touched.read_text()
            touched.write_text(re.sub(r"weight: \d+", "weight: 77", text))
            recompile.append(meshc(root))
            noop.append(meshc(root))
            touched.write_text(text)
        n_files = sum(1 for _ in (root / "rendered").rglob("*") if _.is_file())
        print(f"meshc compile benchmark: {args.services} services × {len(ENVS)} environments, {n_files} output files, {os.cpu_count()} CPUs")
        print(f"this disk creates {n_files} empty files in {creation_cost(root.parent, n_files):.3f} s (part of every cold compile)")
        print(f"python {sys.version.split()[0]}; best of {args.repeat} (median in brackets)")
        for label, xs in (("floor (load + serialise)", floors), ("full compile, cold", full), ("recompile, one policy touched", recompile), ("recompile, nothing changed", noop)):
            print(f"  {label:32s} {min(xs):7.3f} s   [{statistics.median(xs):.3f}]")
        print(f"  full / floor                      {min(full) / min(floors):7.2f} ×")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
