"""The snapshot cache: the last good snapshot per environment, and who to tell when it changes.

Owns publication. `publish` replaces an environment's snapshot and calls every
watcher of that environment; `reject` records why a new one was refused
while the old one keeps serving; `restore` clears that record when the files
return to the served snapshot's bytes. The cache is used from the server's one
event-loop thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from compiler.xds.snapshot import Snapshot

__all__ = ["Cache", "EnvState"]


@dataclass(frozen=True)
class EnvState:
    """What the cache knows of one environment.

    `snapshot` is the last good one (None until one loads); `published_at` is
    its monotonic publication time; `errors` are the problems of the most
    recent load when it was refused (empty after a good load).
    """

    env: str
    snapshot: Snapshot | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    published_at: float = 0.0
    loaded_at_unix: float = 0.0
    load_seconds: float = 0.0
    errors: tuple[str, ...] = ()
    rejected_digest: str = ""
    failures: int = 0
    #: kind → (the version before this publication, the names it added, changed or removed):
    #: what a proxy current at that version lacks, computed once, not per proxy.
    changes: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)


class Cache:
    """Environments by name; watchers by environment."""

    def __init__(self) -> None:
        self._envs: dict[str, EnvState] = {}
        self._watchers: dict[str, set[Callable[[], None]]] = {}

    def get(self, env: str) -> EnvState | None:
        return self._envs.get(env)

    def envs(self) -> list[EnvState]:
        return [self._envs[name] for name in sorted(self._envs)]

    def ready(self) -> bool:
        """At least one environment loaded, and every known one has a good snapshot."""
        return bool(self._envs) and all(s.snapshot is not None for s in self._envs.values())

    def publish(self, snapshot: Snapshot, load_seconds: float, **extras: Any) -> None:
        """Make `snapshot` current for its environment and wake its watchers."""
        old = self._envs.get(snapshot.env) or EnvState(env=snapshot.env)
        self._envs[snapshot.env] = replace(
            old, snapshot=snapshot, extras=extras, published_at=time.monotonic(),
            loaded_at_unix=time.time(), load_seconds=load_seconds, errors=(),
            rejected_digest="", changes=_changes(old.snapshot, snapshot))
        for wake in list(self._watchers.get(snapshot.env, ())):
            wake()

    def reject(self, env: str, digest: str, errors: tuple[str, ...]) -> None:
        """Record that the files with `digest` were refused; the old snapshot stays."""
        old = self._envs.get(env) or EnvState(env=env)
        self._envs[env] = replace(old, errors=errors, rejected_digest=digest,
                                  failures=old.failures + 1)

    def restore(self, env: str) -> None:
        """The files on disk are the served snapshot's again: clear the last rejection.

        Nothing is published (the proxies already have this snapshot), so no watcher wakes.
        """
        self._envs[env] = replace(self._envs[env], errors=(), rejected_digest="")

    def watch(self, env: str, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake()` after each publish for `env`; returns the function that stops it."""
        self._watchers.setdefault(env, set()).add(wake)
        return lambda: self._watchers.get(env, set()).discard(wake)


def _changes(old: Snapshot | None, new: Snapshot) -> dict[str, tuple[str, frozenset[str]]]:
    if old is None:
        return {}
    out = {}
    for kind, typed in new.kinds.items():
        before = old.kinds.get(kind)
        if before is None or before.version == typed.version:
            continue
        a, b = before.resources, typed.resources
        names = {n for n in a.keys() | b.keys() if n not in a or n not in b or a[n].version != b[n].version}
        out[kind] = (before.version, frozenset(names))
    return out
