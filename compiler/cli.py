"""The command line: arguments → pipeline → diagnostics printed, exit code.

Exit codes: 0 success; 1 invalid policy, or `--check` found `rendered/`
stale; 2 usage error. A user's mistake never ends in a traceback.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import orjson

from compiler import __version__
from compiler.cache import Cache, NoCache
from compiler.emit import stale_files, write_rendered
from compiler.errors import CacheDamaged, UsageError
from compiler.load import Source, source_from_dir
from compiler.pipeline import CompileResult, compile_source

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2

# Subcommands other packages define: name → (module, its registering function, one-line help).
# Only the module of the command being run is imported: the GitOps and xDS stacks
# (pygit2, requests, protobuf, gRPC) cost ~0.5 s of start-up that `compile` must not pay.
EXTERNAL = {
    "diff": ("compiler.gitops.cli", "add_parsers", "what a policy change does, per environment, between two revisions"),
    "publish": ("compiler.gitops.cli", "add_parsers", "compile and commit rendered/ (commit-back or a rendered branch)"),
    "comment": ("compiler.gitops.cli", "add_parsers", "post the diff as one sticky pull-request comment"),
    "canary": ("compiler.gitops.cli", "add_parsers", "step, promote, roll back or hold each scheduled canary, from Prometheus"),
    "promote": ("compiler.gitops.cli", "add_parsers", "carry each release from one environment to the next, as a canary"),
    "serve": ("compiler.xds.cli", "add_parser", "serve rendered/*/envoy/ to Envoy proxies over xDS"),
}


# After these the process only exits: `run` skips tearing down what the compile built.
_FAST_EXIT = {"compile", "validate"}


def run() -> None:
    """The console script (and `python -m compiler`): `main`, then exit.

    When compile or validate has finished (exit code 0 or 1), the process ends
    without freeing, one by one, the millions of values the compile built
    (~60 ms at 1,000 services, more than a tenth of a re-compile). By then
    output is flushed here, the cache is saved and closed, every thread has
    been joined and every worker process stopped: nothing is pending. An
    interrupted or refused command exits the ordinary way.
    """
    argv = sys.argv[1:]
    fast = next((a for a in argv if not a.startswith("-")), None) in _FAST_EXIT
    if fast:
        # The process ends soon after, holding millions of acyclic values: a cyclic
        # collection over them only costs time.
        gc.disable()
    code = main(argv)
    if fast and code in (EXIT_OK, EXIT_INVALID):  # finished: not interrupted, not a usage error
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"meshc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `command` (the subcommand being run) is the only external one loaded."""
    parser = argparse.ArgumentParser(prog="meshc", description="Compile service-mesh traffic policy into Istio resources and Envoy xDS snapshots.")
    parser.add_argument("--version", action="version", version=f"meshc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", help="check policies and environments; write nothing")
    _repo_and_envs(validate)
    validate.set_defaults(func=run_validate)

    comp = sub.add_parser("compile", help="compile every environment into rendered/<env>/")
    _repo_and_envs(comp)
    comp.add_argument("--out", type=Path, help="output directory (default: <repo>/rendered)")
    comp.add_argument("--check", action="store_true", help="write nothing; exit 1 if the output directory is stale")
    comp.add_argument("--jobs", type=int, help="worker processes (default: the CPU count)")
    comp.set_defaults(func=run_compile)

    if command in EXTERNAL:
        module, register, _ = EXTERNAL[command]
        getattr(importlib.import_module(module), register)(sub)
    for name, (_, _, summary) in EXTERNAL.items():
        if name not in sub.choices:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def _repo_and_envs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, default=Path("."), help="policy repository (default: current directory)")
    p.add_argument("--env", action="append", dest="envs", metavar="NAME", help="only this environment (repeatable; default: all)")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not update the re-compile cache (kept under ~/.cache/meshc, or $MESHC_CACHE_DIR)")


def _source(args) -> Source:
    repo: Path = args.repo
    if not repo.is_dir():
        raise UsageError(f"--repo {repo}: not a directory")
    try:
        source = source_from_dir(repo)
    except OSError as exc:
        raise UsageError(f"cannot read {repo}: {exc.strerror or exc}") from exc
    if not source.environment_paths():
        raise UsageError(f"{repo}: no environments/*.yaml to compile")
    return source


def _compile(args, out: Path | None = None, source: Source | None = None,
             cache: Cache | NoCache | None = None) -> tuple[CompileResult, threading.Thread, Cache | NoCache, dict | None]:
    """Compile; → the result, the thread saving the re-compile cache (join it, then close the
    cache, before exiting), the cache, and its record of what the last write left in `out`
    (None without a cache), read before the saving thread starts."""
    source = source or _source(args)
    if cache is None:  # validate writes nothing, not even the cache
        cache = NoCache() if args.no_cache or args.func is run_validate else Cache.for_repo(args.repo)
    try:
        result = compile_source(source, args.envs, jobs=getattr(args, "jobs", None), cache=cache, models=False)
    except UsageError:  # --env named no environment
        cache.close()
        raise
    record = cache.written(out) if out is not None and result.ok else None
    # SQLite writes without the GIL: the cache saves while rendered/ is written
    saving = threading.Thread(target=cache.save, name="meshc-cache-save")
    saving.start()
    for d in result.diagnostics:
        print(d.render(), file=sys.stderr)
    return result, saving, cache, record


def _summary(result: CompileResult) -> str:
    return f"{result.services} services × {len(result.outputs)} environments ({', '.join(sorted(result.outputs))})"


def run_validate(args) -> int:
    result, saving, cache, _ = _compile(args)
    saving.join()  # NoCache: nothing to save
    cache.close()
    if not result.ok:
        return EXIT_INVALID
    print(f"meshc: valid: {_summary(result)}", file=sys.stderr)
    return EXIT_OK


def run_compile(args) -> int:
    try:
        return _run_compile(args, use_cache=not args.no_cache)
    except CacheDamaged as exc:  # raised before anything was written, or after it was all undone
        print(f"meshc: warning: the re-compile cache is damaged ({exc}); compiling without it", file=sys.stderr)
        return _run_compile(args, use_cache=False)


def _run_compile(args, use_cache: bool) -> int:
    out: Path = args.out or args.repo / "rendered"
    source = _source(args)
    cache = Cache.for_repo(args.repo) if use_cache else NoCache()
    if not args.check:
        code = _unchanged(args, out, source, cache)
        if code is not None:
            cache.close()
            return code
    result, saving, cache, record = _compile(args, None if args.check else out, source, cache)
    try:
        return _write_or_check(args, result, cache, out, record, _inputs(source, args.envs))
    finally:
        saving.join()
        cache.close()  # saves what the write recorded


def _inputs(source: Source, envs) -> str:
    """SHA-256 of everything a compile reads: its input files and which environments it compiles
    (the compiler is the record's key already)."""
    h = hashlib.sha256(orjson.dumps(sorted(envs) if envs else None))
    for path in sorted(source.files):
        data = source.files[path]
        h.update(b"\n%d %d " % (len(path), len(data)) + path.encode())
        h.update(data)
    return h.hexdigest()


def _unchanged(args, out: Path, source: Source, cache) -> int | None:
    """Nothing changed since the last write: the same inputs compiled into `out` (the cache's
    record says so, by a digest of them) and every file there still has the stat recorded.
    Then nothing is compiled: the write finds nothing to do (it may still remove what does not
    belong, which needs no bytes), and the diagnostics of that compile are printed again.
    → the exit code, or None for a compile (anything differs, or no record)."""
    record = cache.written(out)
    if not record or record.get("inputs") != _inputs(source, args.envs):
        return None
    try:
        diagnostics, summary = [str(line) for line in record["diagnostics"]], str(record["summary"])
        files = {env: record["files"][env] for env in record["compiled"]}
        known = {env: {rel: tuple(entry[1:]) for rel, entry in env_files.items()} for env, env_files in files.items()}
        write_rendered(out, {env: _Recorded(env_files) for env, env_files in files.items()}, prune=not args.envs, known=known)
    except (_Stale, KeyError, TypeError, ValueError, AttributeError):  # a file differs (or a damaged record): compile
        return None
    except OSError as exc:
        print(f"meshc: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    for line in diagnostics:
        print(line, file=sys.stderr)
    print(f"meshc: compiled {summary} into {out}", file=sys.stderr)
    return EXIT_OK


class _Stale(Exception):
    """A file the record vouches for is not as recorded: its bytes are needed, so compile."""


class _Recorded(Mapping):
    """The files a record lists, by path; reading one's bytes raises `_Stale`."""

    def __init__(self, files: dict):
        self._files = files

    def __getitem__(self, path: str) -> bytes:
        raise _Stale(path)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _write_or_check(args, result: CompileResult, cache, out: Path, record: dict | None, inputs: str) -> int:
    if not result.ok:
        errors = sum(1 for d in result.diagnostics if d.is_error)
        print(f"meshc: {errors} error{'s' * (errors != 1)}; nothing written", file=sys.stderr)
        return EXIT_INVALID
    every_env = not args.envs
    if args.check:
        stale = stale_files(out, result.outputs, every_env)
        for line in stale:
            print(f"meshc: stale: {line}", file=sys.stderr)
        if stale:
            print("meshc: rendered output is stale; run `meshc compile` and commit the result", file=sys.stderr)
            return EXIT_INVALID
        print(f"meshc: {out} is current: {_summary(result)}", file=sys.stderr)
        return EXIT_OK
    try:  # record None: no cache, so nothing is recorded and no content key computed
        stats = write_rendered(out, result.outputs, prune=every_env, known=_known(record, result.outputs))
    except OSError as exc:
        print(f"meshc: error: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID
    if record is not None:
        _record(cache, out, record, result, stats, inputs, every_env)
    print(f"meshc: compiled {_summary(result)} into {out}", file=sys.stderr)
    return EXIT_OK


def _record(cache, out: Path, last: dict, result: CompileResult, stats, inputs: str, every_env: bool) -> None:
    """What this write left in `out`, for the next one: each file's content key and stat (the
    other environments' as they were, unless this compile pruned them), and what `_unchanged`
    needs to stand in for this compile (its inputs' digest, diagnostics and summary)."""
    files = {env: {rel: [env_files.key(rel), *stats[env][rel]] for rel in env_files}
             for env, env_files in result.outputs.items()}
    if not every_env and isinstance(last.get("files"), dict):
        files = {**last["files"], **files}
    cache.put_written(out, {"inputs": inputs, "compiled": sorted(result.outputs), "files": files,
                            "diagnostics": [d.render() for d in result.diagnostics], "summary": _summary(result)})


def _known(record: dict | None, outputs) -> dict[str, dict[str, tuple]] | None:
    """From the cache's record of the last write, each file whose content key is the one
    compiled now: its stat then, for `write_rendered` to trust while the file still has it."""
    if not record:
        return None
    known = {}
    for env, files in outputs.items():
        last = (record.get("files") or {}).get(env)
        if isinstance(last, dict):
            known[env] = {rel: tuple(entry[1:]) for rel, entry in last.items()
                          if rel in files and isinstance(entry, list) and len(entry) == 4 and entry[0] == files.key(rel)}
    return known


if __name__ == "__main__":  # pragma: no cover
    run()
