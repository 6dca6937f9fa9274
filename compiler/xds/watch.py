"""Watching the rendered directory: inotify through watchdog, or polling, debounced.

Owns turning file events into one `on_change()` call on the event loop once
the files have been quiet for `debounce` seconds (or at most `10 × debounce`
after the first event, so a steady trickle of writes cannot starve reloads).
Polling compares the bytes of every envoy file (by hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from compiler.xds.snapshot import KINDS, OPTIONAL_FILES, environment_dirs

__all__ = ["Watcher", "fingerprint"]

log = logging.getLogger("meshc.xds")


def fingerprint(root: Path) -> tuple:
    """What polling compares: every rendered/<env>/envoy/*.json with a hash of its bytes.

    Content, not (inode, size, mtime): a same-size rewrite within one kernel
    timestamp tick, into a reused inode, would otherwise look unchanged.
    """
    out = []
    for path in (d / f"{kind}.json" for d in environment_dirs(root) for kind in KINDS + OPTIONAL_FILES):
        try:
            digest = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
        except OSError:
            continue
        out.append((str(path), digest))
    return tuple(out)


class _Handler(FileSystemEventHandler):
    def __init__(self, kick: Callable[[], None]) -> None:
        self._kick = kick

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):
            self._kick()


class _Inotify:
    """Non-recursive inotify watches on `root`, each `root/<env>` and each `root/<env>/envoy`.

    Not one recursive watch: watchdog's recursive watch loses track (its reader
    thread dies with a KeyError, and no event arrives again) when a watched
    directory is exchanged with renameat2(RENAME_EXCHANGE), which is how
    `meshc compile` swaps `rendered/<env>`. `refresh()` re-aims the watches at the
    directories now at those paths; the watcher calls it on every event, before
    the debounced reload reads the files, so nothing written meanwhile is missed.
    """

    def __init__(self, root: Path, kick: Callable[[], None]) -> None:
        self._root = root
        self._handler = _Handler(kick)
        self._observer = Observer()
        self._observer.daemon = True
        self._watches: dict[str, tuple[tuple[int, int], ObservedWatch]] = {}
        self._observer.schedule(self._handler, str(root), recursive=False)   # OSError if missing
        self._observer.start()
        self.refresh()

    def refresh(self) -> None:
        wanted = {}
        for path in _watched_dirs(self._root):
            try:
                stat = os.stat(path)
            except OSError:
                continue
            wanted[str(path)] = (stat.st_dev, stat.st_ino)
        for path, (ident, watch) in list(self._watches.items()):
            if wanted.get(path) != ident:
                del self._watches[path]
                with contextlib.suppress(KeyError, OSError):    # its emitter may have ended
                    self._observer.unschedule(watch)
        for path, ident in wanted.items():
            if path not in self._watches:
                try:
                    watch = self._observer.schedule(self._handler, path, recursive=False)
                except OSError:
                    continue        # gone again; its parent's event brings us back
                self._watches[path] = (ident, watch)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=2)


def _watched_dirs(root: Path) -> list[Path]:
    """`root/<env>` (not hidden) and `root/<env>/envoy`, where they are directories."""
    try:
        names = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".")
                       and e.is_dir(follow_symlinks=False))
    except OSError:
        return []
    envs = [root / name for name in names]
    return envs + [env / "envoy" for env in envs if (env / "envoy").is_dir()]


class Watcher:
    """Calls `on_change()` on `loop`, debounced, after anything under `root` changes.

    `mode` is "auto" (inotify, else polling), "inotify" or "poll".
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, root: Path, on_change: Callable[[], None],
                 *, debounce: float, mode: str = "auto", poll_interval: float = 1.0) -> None:
        self._loop = loop
        self._root = root
        self._on_change = on_change
        self._debounce = debounce
        self._mode = mode
        self._poll_interval = poll_interval
        self._observer: _Inotify | None = None
        self._poller: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_event = 0.0
        self.using = ""

    def start(self) -> None:
        if self._mode in ("auto", "inotify"):
            try:
                self._observer, self.using = _Inotify(self._root, self._kick_threadsafe), "inotify"
                return
            except OSError as exc:
                if self._mode == "inotify":
                    raise
                log.warning("cannot watch %s with inotify (%s); polling every %ss",
                            self._root, exc, self._poll_interval)
        self.using = "poll"
        # The baseline is taken now, not in the task: a change made right after
        # start() returns must differ from it.
        self._poller = self._loop.create_task(self._poll(fingerprint(self._root)))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        if self._poller is not None:
            self._poller.cancel()
        if self._timer is not None:
            self._timer.cancel()

    async def _poll(self, last: tuple) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                now = await asyncio.to_thread(fingerprint, self._root)
            except OSError as exc:      # a directory swapped mid-scan: look again next time
                log.debug("poll of %s failed: %s", self._root, exc)
                continue
            if now != last:
                last = now
                self._kick()

    def _kick_threadsafe(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._kick)
        except RuntimeError:
            pass                # loop closed while shutting down

    def _kick(self) -> None:
        if self._observer is not None:
            self._observer.refresh()
        now = time.monotonic()
        if self._timer is None:
            self._first_event = now
        else:
            self._timer.cancel()
        delay = min(self._debounce, max(0.0, self._first_event + 10 * self._debounce - now))
        self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._on_change()
