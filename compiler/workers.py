"""Worker processes: how the pipeline spreads independent work over the CPUs.

Workers are forked, so they inherit the parent's loaded inputs instead of
receiving them pickled; results travel back pickled (or as JSON bytes, where
the caller chooses). Below a size, forking costs more than it saves: callers
compare their work with the thresholds here. Every pool is shut down before
its caller returns, whatever happened meanwhile: no worker outlives it.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable, Sequence

__all__ = ["CHUNKS_PER_WORKER", "PARALLEL_THRESHOLD", "PARSE_THRESHOLD", "Pool", "count", "map_inherited"]

# Below this many units to compute (policy files to parse), worker processes cost more than they save.
PARALLEL_THRESHOLD = 400
PARSE_THRESHOLD = 200
# Several chunks a worker, handed out as workers finish: the cores of a shared machine do not all run at one speed.
CHUNKS_PER_WORKER = 4


def count(jobs: int | None) -> int:
    """The worker count: `jobs`, else the CPU count."""
    return jobs if jobs is not None else (os.cpu_count() or 1)


class Pool:
    """Forked workers for tasks submitted now and collected later; `close` stops them
    (at once, cancelling what has not started, when nobody will collect it)."""

    def __init__(self, jobs: int):
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork"))

    def submit(self, function: Callable, *args) -> Future:
        assert self._pool is not None, "submit after close"
        return self._pool.submit(function, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


_INHERITED = None  # what `map_inherited`'s workers read: set in the parent just before they fork


def map_inherited(function: Callable, work, chunks: Sequence, jobs: int) -> list:
    """`[function(work, chunk) for chunk in chunks]`, computed in `jobs` forked workers.
    `work` reaches them by inheritance, never pickled; the results come back in order."""
    global _INHERITED
    _INHERITED = (function, work)
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("fork")) as pool:
            return list(pool.map(_run_inherited, chunks))
    finally:
        _INHERITED = None


def _run_inherited(chunk):
    function, work = _INHERITED
    return function(work, chunk)
