"""How long `meshc serve` takes to load an environment's snapshot: from nothing, and again
after one policy changed (reusing the served snapshot's unchanged files and resources).

Run:  .venv/bin/python bench/reload.py [--services 1000] [--repeat 5] [--calls 10]

Generates bench/compile.py's repository (N services × 3 environments, each service's
egress listing `--calls` others), compiles it with `meshc compile`, loads every
environment's snapshot with its scopes, as the server does (the cold figure), changes one
policy's canary weight, compiles again, and loads each environment with the previous
snapshot (the reload figure; in the server this runs on its loader thread). Best of
`--repeat`, median in brackets. Prints the number of resources each load parsed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import compile as compile_bench  # noqa: E402  bench/compile.py: the repository generator

from compiler.xds import scope  # noqa: E402
from compiler.xds.snapshot import KINDS, load_snapshot, read_files  # noqa: E402


def _load(env: str, files: dict, previous=None):
    """What the server's loader does with an environment's files (without other environments)."""
    return scope.attach(load_snapshot(env, files, previous), files.get(scope.FILE), previous)


def _timed(fn, repeat: int) -> tuple[float, float, object]:
    times, value = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times), value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--calls", type=int, default=10, help="services each service's egress lists (0: no scopes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshc-reload-") as tmp:
        repo = Path(tmp) / "repo"
        compile_bench.generate(repo, args.services, args.calls)
        compile_bench.recompile(repo)
        envs = sorted(p.name for p in (repo / "rendered").iterdir() if not p.name.startswith("."))
        files = {env: read_files(repo / "rendered" / env / "envoy") for env in envs}
        cold = {env: _timed(lambda env=env: _load(env, files[env]), args.repeat) for env in envs}
        policy, _ = compile_bench.touch(repo)
        compile_bench.recompile(repo)
        print(f"{args.services} services × {len(envs)} environments, each calling {args.calls}; "
              "one policy's canary weight changed "
              f"({policy.relative_to(repo)}); best of {args.repeat} [median]")
        print(f"{'environment':12} {'resources':>9} {'cold load':>18} {'reload':>18} {'changed files':>14}")
        for env in envs:
            new = read_files(repo / "rendered" / env / "envoy")
            previous = cold[env][2]
            best, median, snapshot = _timed(lambda: _load(env, new, previous), args.repeat)
            fresh = _load(env, new)
            assert snapshot.kinds == fresh.kinds, "a reload is the same snapshot as a load from nothing"
            count = sum(len(t.resources) for t in previous.kinds.values())
            changed = [k for k in KINDS if new[k] != files[env][k]]
            print(f"{env:12} {count:>9} {cold[env][0] * 1000:>9.0f} ms [{cold[env][1] * 1000:.0f}]"
                  f" {best * 1000:>9.1f} ms [{median * 1000:.1f}] {','.join(changed) or '-':>14}")


if __name__ == "__main__":
    main()
