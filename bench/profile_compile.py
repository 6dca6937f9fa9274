"""Profile one `meshc compile` in-process: where its time goes, by call tree.

Runs `compiler.cli.main(["compile", "--repo", REPO])` under cProfile, in this
process, with the cyclic GC off as `meshc`'s own entry point has it, and
every thread the compile starts (the cache saves on one) profiled on its own.
Prints the call tree from the top (each node's cumulative seconds, as its
caller saw them), then the functions with the most time of their own.

The compiler imported is whichever `import compiler` finds: bench/compile.py
runs this with PYTHONPATH and the working directory set so that it is the
one being measured, and prints the path below. Nothing under compiler/ is
changed or instrumented. cProfile slows Python-level calls (by ~1.5-2x in
call-heavy code), so read the tree for proportions, not for the seconds of
an unprofiled run.

Usage: python bench/profile_compile.py --repo DIR [--depth 9] [--min 0.01] [--top 25] [--out FILE.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import sys
import threading
import time

_threads: list[tuple[str, cProfile.Profile]] = []


def _profile_threads() -> None:
    """Each thread started from here on runs under a profiler of its own (cProfile sees one thread)."""
    original = threading.Thread.run

    def run(self):
        profile = cProfile.Profile()
        _threads.append((self.name, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run


def _compile(repo: str) -> int:
    from compiler import cli  # the import is part of a run's cost, as in `python -m compiler`

    return cli.main(["compile", "--repo", repo])


def _label(func: tuple) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        parts = path.split(os.sep)
        path = "/".join(parts[parts.index("compiler"):]) if "compiler" in parts else os.path.basename(path)
    return f"{path}:{line}({name})"


def _children(stats: pstats.Stats, parent: tuple) -> list[tuple[float, int, tuple]]:
    """(cumulative seconds spent in it from `parent`, calls from `parent`, function), largest first."""
    out = []
    for func, (_, _, _, _, callers) in stats.stats.items():
        if parent in callers:
            nc, _, _, ct = callers[parent]
            out.append((ct, nc, func))
    return sorted(out, key=lambda x: -x[0])


def print_tree(stats: pstats.Stats, root: tuple, total: float, depth: int, minimum: float, width: int = 8) -> None:
    def walk(func: tuple, seconds: float, calls: int, level: int, seen: frozenset) -> None:
        own = stats.stats[func][2]
        shared = "*" if len(stats.stats[func][4]) > 1 else " "
        print(f"  {seconds:8.3f} s {100 * seconds / total:5.1f} %  {calls:>7}×{shared} {'  ' * level}{_label(func)}"
              + (f"   [own {own:.3f} s]" if own >= minimum * total else ""))
        if level >= depth or func in seen or func[0].startswith("<frozen importlib"):
            return  # an import's own tree is the interpreter's: one line says what it costs
        kids = [k for k in _children(stats, func) if k[0] >= minimum * total]
        for ct, nc, kid in kids[:width]:
            walk(kid, ct, nc, level + 1, seen | {func})

    walk(root, stats.stats[root][3], stats.stats[root][1], 0, frozenset())


def print_own(stats: pstats.Stats, top: int) -> None:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for func, (_, nc, tt, ct, callers) in rows:
        by = sorted(callers.items(), key=lambda kv: -kv[1][3])[:2]
        print(f"  {tt:8.3f} s own  {ct:8.3f} s cum  {nc:>9}×  {_label(func)}"
              + "".join(f"\n{'':44s}← {c[3]:.3f} s from {_label(f)}" for f, c in by))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--depth", type=int, default=9, help="levels of the call tree")
    ap.add_argument("--min", type=float, default=0.01, help="leave out calls under this share of the total")
    ap.add_argument("--top", type=int, default=25, help="functions listed by their own time")
    ap.add_argument("--out", help="also write the main thread's pstats here")
    args = ap.parse_args()

    gc.disable()  # as compiler.cli.run does for compile
    _profile_threads()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    code = _compile(args.repo)
    profile.disable()
    wall = time.perf_counter() - start
    import compiler

    print(f"profiled `meshc compile --repo {args.repo}` (exit {code}) with {compiler.__file__}")
    print(f"wall time under the profiler {wall:.3f} s (cProfile's overhead included)")
    if args.out:
        profile.dump_stats(args.out)
    stats = pstats.Stats(profile)
    root = next(f for f in stats.stats if f[2] == "_compile" and f[0] == __file__)
    total = stats.stats[root][3]
    print(f"\nmain thread, call tree (cumulative s, share, calls; calls under {args.min:.0%} left out;"
          " * called from more than one place: cProfile keeps one level of callers, so the callees"
          " listed under it are its totals from every caller):")
    print_tree(stats, root, total, args.depth, args.min)
    print(f"\nmain thread, the {args.top} functions with the most time of their own:")
    print_own(stats, args.top)
    for name, thread_profile in _threads:
        tstats = pstats.Stats(thread_profile)
        if not tstats.stats:
            continue
        troot = max((f for f, v in tstats.stats.items() if not v[4]), key=lambda f: tstats.stats[f][3])  # no caller
        ttotal = tstats.stats[troot][3]
        print(f"\nthread {name!r} ({ttotal:.3f} s, overlapping the main thread until it joins):")
        print_tree(tstats, troot, ttotal, args.depth, args.min)
    sys.stdout.flush()
    os._exit(code)  # as compiler.cli.run does: no tear-down of the compile's values


if __name__ == "__main__":
    main()
