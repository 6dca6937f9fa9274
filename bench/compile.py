"""Compile benchmark: a synthetic repo of N services × 3 environments.

Reports, in one run on this machine:
  floor       reading + composing every input with ruamel.yaml's C parser, and
              serialising every output with PyYAML's C emitter and the
              standard library's json (its pure-Python encoder, as `indent`
              makes it) — a serial reference, not meshc's own serialisers;
  full        `meshc compile` of the whole repo, cold (no rendered/, empty cache);
  recompile   `meshc compile` again after touching one policy (warm cache);
  noop        `meshc compile` again with nothing changed.

Each is a fresh `python -m compiler` process (the floor excepted, which runs in
this one); wall time is what is reported, with the process's CPU time (user +
system, its worker processes included) and peak RSS beside it.

  --services 1000,10000   one repo per size, in order, and a growth table: each
                          size's figures as a ratio to the first size's
  --compare REV           this repository's compiler at REV (git archive into a
                          temp dir, first on PYTHONPATH) against the working
                          tree's, on the same repo, run by run (old, new, old,
                          new ...), each with its own cache dir; adds new/old
  --profile               after the measured runs, one touched re-compile of the
                          working tree's compiler at each size under cProfile
                          (bench/profile_compile.py), its call tree printed
  --no-floor              skip the floor (it costs ~35 s a run at 10,000 services)
  --keep DIR              generate the repo in DIR (DIR/<N> for several sizes) and leave it
                          there; rendered trees and caches are still moved aside and
                          deleted, so every cold run starts from nothing
  --json FILE             every run's figures, for later comparison

Before each timed run the file system is synced (not timed): a cold compile
leaves about 800 MB of dirty pages at 10,000 services (rendered/ and the
cache), whose write-back otherwise lands in the re-compile timed after it.

Usage: python bench/compile.py [--services 1000[,10000]] [--repeat 3] [--compare REV]
                               [--profile] [--no-floor] [--keep DIR] [--json FILE]
"""


import argparse
import compileall
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ruamel.yaml import CSafeLoader

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent  # the working tree whose compiler/ is "new"
TOUCHED = ("team-07", "svc-0007")  # the policy a re-compile changes (its canary weight); exists at every size ≥ 8

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


def service(i: int) -> str:
    """Service i's `namespace/name`."""
    return f"team-{i % 25:02d}/svc-{i:04d}"


def egress(n: int, calls: int) -> list[str]:
    """Each service's egress line: `calls` others of the `n`, drawn with a fixed seed."""
    rng = random.Random(7)
    return [f"  egress: [{', '.join(sorted(service(j) for j in rng.sample([j for j in range(n) if j != i], calls)))}]\n"
            for i in range(n)]


def generate(root: Path, n: int, calls: int = 0) -> None:
    """The repository of `n` services × 3 environments at `root`; with `calls`, every service
    also lists that many others in its egress (the serve benchmarks' scoped proxies)."""
    rng = random.Random(42)
    lines = egress(n, calls) if calls else [""] * n
    for i in range(n):
        path = root / "policies" / f"team-{i % 25:02d}" / f"svc-{i:04d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(policy(i, rng) + lines[i])
    (root / "environments").mkdir(parents=True, exist_ok=True)
    for env in ENVS:
        (root / "environments" / f"{env}.yaml").write_text(environment(env, n))


def floor(root: Path) -> dict[str, float]:
    """Load every input and serialise every output with the same libraries, nothing else.
    → seconds: total, and its parts (inputs parsed, YAML emitted, JSON emitted)."""
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
    parsed = time.perf_counter()
    for docs in yaml_outputs:
        yaml.dump_all(docs, Dumper=Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16)
    emitted = time.perf_counter()
    for value in json_outputs:
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    end = time.perf_counter()
    return {"total": end - start, "inputs": parsed - start, "yaml": emitted - parsed, "json": end - emitted}


# -- the compilers being timed ---------------------------------------------------------------


@dataclass
class Side:
    """One compiler: the `compiler/` package under `path`, with a re-compile cache of its own."""

    label: str
    path: Path  # the directory holding compiler/, put first on PYTHONPATH
    cache: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.path), *filter(None, [env.get("PYTHONPATH")])])
        env["MESHC_CACHE_DIR"] = str(self.cache)
        env["XDG_CACHE_HOME"] = str(self.cache / "xdg")  # should a revision not know MESHC_CACHE_DIR
        return env


@dataclass
class Run:
    wall: float
    cpu: float  # user + system of the process and the workers it waited for
    rss_mb: float  # peak resident set of the process or of its largest worker


def meshc(side: Side, root: Path, cwd: Path, *args: str) -> Run:
    """One `python -m compiler compile --repo ROOT` of `side`'s compiler. `cwd` holds no
    compiler/ of its own: `-m` puts the working directory before PYTHONPATH."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "compiler", "compile", "--repo", str(root), *args],
                                env=side.env(), cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{side.label}: meshc compile failed ({proc.returncode}): {err.read().decode(errors='replace')[-2000:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def imported_from(side: Side, cwd: Path) -> str:
    """Where `import compiler` resolves for `side`'s processes; exits unless it is `side.path`."""
    done = subprocess.run([sys.executable, "-c", "import compiler; print(compiler.__file__)"],
                          env=side.env(), cwd=cwd, capture_output=True, text=True, check=True)
    where = done.stdout.strip()
    if Path(where).resolve() != (side.path / "compiler" / "__init__.py").resolve():
        raise SystemExit(f"{side.label}: `import compiler` found {where}, not {side.path / 'compiler'}")
    return where


def as_installed(package: Path = CHECKOUT / "compiler") -> None:
    """meshc as installed: its bytecode compiled (as a wheel install does), not compiled
    again by every timed run where PYTHONDONTWRITEBYTECODE is set."""
    compileall.compile_dir(package, quiet=1)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(CHECKOUT), *args], check=True, capture_output=True, text=True).stdout.strip()


def materialise(rev: str, into: Path) -> str:
    """This repository's compiler/ at `rev`, extracted under `into` (its bytecode compiled). → the commit."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", "--format=tar", commit, "compiler"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    as_installed(into / "compiler")
    return commit


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


# -- one size ----------------------------------------------------------------------------------

RUNS = ("cold", "touched", "noop")
LABELS = {"floor": "floor (load + serialise)", "cold": "full compile, cold",
          "touched": "recompile, one policy touched", "noop": "recompile, nothing changed"}


@dataclass
class Figures:
    """Every run of one compiler at one size."""

    floor: list[dict[str, float]] = field(default_factory=list)
    runs: dict[str, list[Run]] = field(default_factory=lambda: {k: [] for k in RUNS})
    outputs: int = 0

    def walls(self, what: str) -> list[float]:
        return [f["total"] for f in self.floor] if what == "floor" else [r.wall for r in self.runs[what]]

    def best(self, what: str) -> float | None:
        xs = self.walls(what)
        return min(xs) if xs else None

    def median(self, what: str) -> float | None:
        xs = self.walls(what)
        return statistics.median(xs) if xs else None


def measure(root: Path, sides: list[Side], repeat: int, with_floor: bool, cwd: Path, trash: Path) -> dict[str, Figures]:
    """`repeat` rounds; in each, every side in turn: cold, (floor), touched, noop."""
    figures = {side.label: Figures() for side in sides}
    touched = root / "policies" / TOUCHED[0] / f"{TOUCHED[1]}.yaml"
    text = touched.read_text()
    for round_ in range(repeat):
        for side in sides:
            fig = figures[side.label]
            # Cold: no rendered/, no cache. Both are moved aside and deleted after the last run:
            # deleting thousands of files right before one makes the disk's next file creations
            # slow (this VM's ext4 discards freed blocks), which is the set-up's cost, not meshc's.
            aside(root / "rendered", side.cache, trash=trash)
            os.sync()
            fig.runs["cold"].append(meshc(side, root, cwd))
            if not fig.outputs:
                fig.outputs = sum(1 for p in (root / "rendered").rglob("*") if p.is_file())
            if with_floor:
                fig.floor.append(floor(root))
            # A weight no earlier run wrote, so the cache never holds the touched unit already.
            touched.write_text(re.sub(r"weight: \d+", f"weight: {51 + round_ % 49}", text))
            os.sync()
            fig.runs["touched"].append(meshc(side, root, cwd))
            os.sync()
            fig.runs["noop"].append(meshc(side, root, cwd))
            touched.write_text(text)
    return figures


def cell(fig: Figures, what: str) -> str:
    best = fig.best(what)
    return "—" if best is None else f"{best:7.3f} s [{fig.median(what):.3f}]"


def report(n: int, sides: list[Side], figures: dict[str, Figures], repeat: int, disk: float, load: tuple[float, float]) -> None:
    outputs = {figures[s.label].outputs for s in sides}
    print(f"\nmeshc compile benchmark: {n} services × {len(ENVS)} environments, "
          f"{'/'.join(map(str, sorted(outputs)))} output files, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after")
    print(f"this disk creates {max(outputs)} empty files in {disk:.3f} s (part of every cold compile)")
    print(f"python {sys.version.split()[0]}; best of {repeat} (median in brackets); wall time")
    header = f"  {'':32s}" + "".join(f" {s.label:>26s}" for s in sides)
    if len(sides) == 2:
        header += f" {'new/old best [median]':>24s}"
    print(header)
    for what in ("floor", *RUNS):
        row = f"  {LABELS[what]:32s}" + "".join(f" {cell(figures[s.label], what):>26s}" for s in sides)
        if len(sides) == 2:
            old, new = figures[sides[0].label], figures[sides[1].label]
            if old.best(what) and new.best(what):
                row += f" {new.best(what) / old.best(what):11.2f} × [{new.median(what) / old.median(what):.2f} ×]"
        print(row)
    if all(figures[s.label].floor for s in sides):
        print(f"  {'full / floor (best / best)':32s}" + "".join(
            f" {figures[s.label].best('cold') / figures[s.label].best('floor'):24.2f} ×" for s in sides))
        parts = figures[sides[-1].label].floor
        best = min(parts, key=lambda f: f["total"])
        print(f"  the floor's best run: inputs {best['inputs']:.3f} s, YAML out {best['yaml']:.3f} s, JSON out {best['json']:.3f} s")
    print("  CPU s (user + sys, workers included), best; peak RSS MB, largest:")
    for what in RUNS:
        print(f"    {what:8s}" + "".join(
            f"   {s.label}: {min(r.cpu for r in figures[s.label].runs[what]):6.2f} s, {max(r.rss_mb for r in figures[s.label].runs[what]):6.0f} MB"
            for s in sides))


def growth(sizes: list[int], sides: list[Side], results: dict[int, dict[str, Figures]]) -> None:
    base = sizes[0]
    print(f"\ngrowth: each size against the {base}-service row (best, median in brackets); "
          f"targets: cold ≤ 10 × the {base}-service cold compile at 10 × the services, touched ≤ 0.5 s at every size")
    for side in sides:
        print(f"  {side.label}:")
        print(f"    {'services':>8s} {'outputs':>8s} {'cold':>20s} {'touched':>20s} {'noop':>20s} {'cold ×':>14s} {'touched ×':>14s}")
        b = results[base][side.label]
        for n in sizes:
            f = results[n][side.label]
            print(f"    {n:8d} {f.outputs:8d} {cell(f, 'cold'):>20s} {cell(f, 'touched'):>20s} {cell(f, 'noop'):>20s}"
                  f" {f.best('cold') / b.best('cold'):6.2f} [{f.median('cold') / b.median('cold'):4.2f}]"
                  f" {f.best('touched') / b.best('touched'):6.2f} [{f.median('touched') / b.median('touched'):4.2f}]")


def touch(root: Path) -> tuple[Path, str]:
    """Change the touched policy's canary weight to one no generated or measured run has:
    (its path, its text before), for whoever puts it back."""
    touched = root / "policies" / TOUCHED[0] / f"{TOUCHED[1]}.yaml"
    text = touched.read_text()
    touched.write_text(re.sub(r"weight: \d+", "weight: 100", text))
    return touched, text


def compiled(root: Path, n: int, *envs: str) -> Path:
    """The generated repository of `n` services at `root`, compiled by `meshc compile` into
    root/rendered (only `envs` when given): the server benchmarks' input."""
    generate(root, n)
    recompile(root, *envs)
    return root


def recompile(root: Path, *envs: str) -> None:
    args = [arg for env in envs for arg in ("--env", env)]
    subprocess.run([sys.executable, "-m", "compiler", "compile", "--repo", str(root), "--no-cache", *args],
                   check=True, capture_output=True, cwd=CHECKOUT)


def profile(root: Path, side: Side, cwd: Path) -> None:
    """One more touched re-compile of `side`'s compiler at this size, under cProfile, in-process."""
    meshc(side, root, cwd)  # rendered/ and the cache as the original policy leaves them
    touched, text = touch(root)
    os.sync()
    try:
        print(f"\n-- profile: the touched re-compile of {side.label}, {root.name} --", flush=True)
        subprocess.run([sys.executable, str(HERE / "profile_compile.py"), "--repo", str(root)],
                       env=side.env(), cwd=cwd, check=True)
    finally:
        touched.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", default="1000", help="a size, or sizes separated by commas (1000,10000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compare", metavar="REV", help="also time this repository's compiler/ at REV, run by run")
    ap.add_argument("--profile", action="store_true", help="then profile one touched re-compile at each size")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor")
    ap.add_argument("--keep", type=Path, help="generate the repo here (DIR/<N> for several sizes) and keep it")
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.services.split(",")]
    if min(sizes) < 8:
        ap.error("--services: at least 8 (the touched policy is the 8th)")

    if args.keep:
        args.keep = args.keep.resolve()
        args.keep.parent.mkdir(parents=True, exist_ok=True)
    # Everything this run makes, on one filesystem (rendered trees and caches are moved aside by rename).
    work = Path(tempfile.mkdtemp(prefix="meshc-bench-", dir=args.keep.parent if args.keep else None))
    cwd = work / "cwd"  # an empty working directory: `python -m` would import a compiler/ beside it
    cwd.mkdir()
    as_installed()
    head = git("describe", "--always", "--dirty", "--abbrev=7")
    sides = [Side(f"new ({head})", CHECKOUT, work / "cache-new")]
    try:
        if args.compare:
            commit = materialise(args.compare, work / "old")
            sides.insert(0, Side(f"old ({commit[:7]})", work / "old", work / "cache-old"))
        for side in sides:
            print(f"{side.label}: `python -m compiler` imports {imported_from(side, cwd)}")
        # What runs leave behind is deleted only at the very end, not between sizes (see `measure`).
        trash = work / "trash"
        trash.mkdir()
        results: dict[int, dict[str, Figures]] = {}
        for n in sizes:
            root = (args.keep / str(n) if len(sizes) > 1 else args.keep) if args.keep else work / f"repo-{n}"
            started = time.perf_counter()
            generate(root, n)
            print(f"generated {n} services × {len(ENVS)} environments in {time.perf_counter() - started:.2f} s: {root}", flush=True)
            load = os.getloadavg()[0]
            results[n] = measure(root, sides, args.repeat, not args.no_floor, cwd, trash)
            n_files = max(f.outputs for f in results[n].values())
            report(n, sides, results[n], args.repeat, creation_cost(work, n_files), (load, os.getloadavg()[0]))
            if args.profile:
                profile(root, sides[-1], cwd)
        if len(sizes) > 1:
            growth(sizes, sides, results)
        if args.json:
            args.json.write_text(json.dumps({
                "python": sys.version.split()[0], "cpus": os.cpu_count(), "repeat": args.repeat,
                "sides": [s.label for s in sides],
                "sizes": {n: {label: {"outputs": f.outputs, "floor": f.floor,
                                      **{k: [vars(r) for r in rs] for k, rs in f.runs.items()}}
                              for label, f in by_side.items()} for n, by_side in results.items()},
            }, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
