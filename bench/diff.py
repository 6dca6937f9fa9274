"""Diff benchmark: `meshc diff` between two revisions of the N-service repo that
differ in one policy (a canary weight), against one full `meshc compile`.

Reports, in one run on this machine (each a fresh process, like a CI step):
  compile         `meshc compile`, cold (empty re-compile cache): the yardstick;
  diff, cold      `meshc diff --base HEAD~1 --head HEAD` with no cache at all;
  diff, warm      the same after `meshc compile` ran on the head (as in the PR
                  workflow, where validate and compile --check come first);
  diff, no cache  `meshc diff --no-cache`: two full compiles and the compare.

The target (issue 5) is diff, cold ≤ 2 × compile.

Usage: python bench/diff.py [--services 1000] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
def generator():
    spec = importlib.util.spec_from_file_location("bench_compile", HERE / "compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_repo(root: Path, services: int) -> str:
    """The benchmark repo in git: HEAD~1 as generated, HEAD with one canary weight changed."""
    generator().generate(root, services)
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    subprocess.run([*GIT, "-C", str(root), "add", "policies", "environments"], check=True)
    subprocess.run([*GIT, "-C", str(root), "commit", "-qm", "generated"], check=True)
    touched = root / "policies" / "team-01" / "svc-0001.yaml"
    touched.write_text(re.sub(r"weight: \d+", "weight: 45", touched.read_text()))
    subprocess.run([*GIT, "-C", str(root), "commit", "-qam", "svc-0001: canary 45%"], check=True)
    return str(touched.relative_to(root))


def timed(*argv: str, env=None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed, done.stdout


def run(root: Path, repeat: int) -> dict[str, list[float]]:
    cache = root.parent / f"{root.name}.cache"
    os.environ["MESHC_CACHE_DIR"] = str(cache)  # the meshc processes' re-compile cache, removed for cold runs
    times: dict[str, list[float]] = {"compile": [], "diff, cold": [], "diff, warm": [], "diff, no cache": []}
    diff = ("-m", "compiler", "diff", "--repo", str(root), "--base", "HEAD~1", "--head", "HEAD", "--format", "text")
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(root / "rendered", ignore_errors=True)
        times["compile"].append(timed("-m", "compiler", "compile", "--repo", str(root))[0])
        shutil.rmtree(cache, ignore_errors=True)
        elapsed, out = timed(*diff)
        times["diff, cold"].append(elapsed)
        shutil.rmtree(cache, ignore_errors=True)
        timed("-m", "compiler", "compile", "--repo", str(root))
        times["diff, warm"].append(timed(*diff)[0])
        times["diff, no cache"].append(timed(*diff, "--no-cache")[0])
    print("the diff said:\n" + "\n".join("    " + line for line in out.splitlines()[:6]))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="generate the repo here and keep it")
    args = ap.parse_args()
    generator().as_installed()  # the same meshc bench/compile.py times
    root = args.keep or Path(tempfile.mkdtemp(prefix="meshc-bench-diff-"))
    try:
        touched = make_repo(root, args.services)
        times = run(root, args.repeat)
        print(f"meshc diff benchmark: {args.services} services × 3 environments, one policy changed ({touched}), "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"python {sys.version.split()[0]}; best of {args.repeat} (median in brackets)")
        for label, xs in times.items():
            print(f"  {label:16s} {min(xs):7.3f} s   [{statistics.median(xs):.3f}]")
        for label in ("diff, cold", "diff, warm", "diff, no cache"):
            print(f"  {label + ' / compile':26s} {min(times[label]) / min(times['compile']):5.2f} ×")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
