"""A content-addressed cache for re-compiles: never a stale result.

The cache lives outside the repository, in the user's cache directory
(`$MESHC_CACHE_DIR`, else `$XDG_CACHE_HOME/meshc`, else `~/.cache/meshc`),
one SQLite file per repository path: nothing a commit can plant is ever read,
and every value is JSON (never pickle). Two tables:

- `units`: JSON values keyed by content: one service in one environment,
  compiled (each target's fragment), keyed by SHA-256 of the compiler's
  fingerprint, the policy file's path and bytes and the environment file's
  path and bytes, which is everything that service's output depends on; and
  each valid input file, parsed, keyed by the fingerprint, its path and its
  bytes. Only clean results are stored (no diagnostics), so a cached result
  never hides one.
- `yaml`: serialised YAML documents, keyed by SHA-256 of the fingerprint and
  the document's canonical JSON.

The fingerprint hashes the compiler's own source and the versions of the
libraries that shape the output bytes, so any change to either starts over.
A corrupt or unreadable cache is treated as empty.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from functools import lru_cache
from pathlib import Path

import orjson
import yaml

import compiler

PRUNE_SLACK = 1000  # unused unit entries tolerated beyond twice this run's
YAML_LIMIT = 200_000  # documents; past this the memo starts over


@lru_cache(maxsize=1)
def fingerprint() -> bytes:
    h = hashlib.sha256()
    root = Path(compiler.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    h.update(f"pyyaml {yaml.__version__} orjson {orjson.__version__}".encode())
    return h.digest()


def file_key(path: str, content: bytes) -> bytes:
    return hashlib.sha256(fingerprint() + path.encode() + b"\0" + content).digest()


def unit_key(policy_key: bytes, env_key: bytes) -> bytes:
    return hashlib.sha256(policy_key + env_key).digest()


def cache_root() -> Path:
    explicit = os.environ.get("MESHC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshc"


class Cache:
    """The on-disk cache. Reads everything once; writes only what is new."""

    @classmethod
    def for_repo(cls, repo: Path) -> "Cache":
        """The cache of the repository at `repo` (keyed by its absolute path)."""
        where = hashlib.sha256(str(Path(repo).resolve()).encode()).hexdigest()[:16]
        return cls(cache_root() / where)

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._db: sqlite3.Connection | None = None
        self.units: dict[bytes, bytes] = {}
        self.yaml: dict[bytes, bytes] = {}
        self._new_units: dict[bytes, bytes] = {}
        self._used: set[bytes] = set()
        self._new_yaml: dict[bytes, bytes] = {}
        self._open()

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.directory / "cache.sqlite", timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # a cache: no fsync per commit
            self._db.execute("CREATE TABLE IF NOT EXISTS units (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS yaml (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
            self.units = dict(self._db.execute("SELECT key, value FROM units"))
            self.yaml = dict(self._db.execute("SELECT key, value FROM yaml"))
        except (OSError, sqlite3.Error):
            self._db, self.units, self.yaml = None, {}, {}

    def get_json(self, key: bytes):
        self._used.add(key)
        raw = self.units.get(key)
        if raw is None:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:  # a damaged entry: recompute
            return None

    def put_json(self, key: bytes, value) -> None:
        self._used.add(key)
        raw = orjson.dumps(value)
        self.units[key] = raw
        self._new_units[key] = raw

    def put_yaml(self, entries: dict[bytes, bytes]) -> None:
        for key, value in entries.items():
            if key not in self.yaml:
                self.yaml[key] = value
                self._new_yaml[key] = value

    def save(self) -> None:
        if self._db is None or not (self._new_units or self._new_yaml):
            return
        stale = [(k,) for k in self.units if k not in self._used] if len(self.units) > 2 * len(self._used) + PRUNE_SLACK else []
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO units VALUES (?, ?)", self._new_units.items())
                self._db.executemany("INSERT OR REPLACE INTO yaml VALUES (?, ?)", self._new_yaml.items())
                # Keep the cache near the size of one repo: entries this run did not use go once they dominate.
                self._db.executemany("DELETE FROM units WHERE key = ?", stale)
                if len(self.yaml) > YAML_LIMIT:
                    self._db.execute("DELETE FROM yaml")
        except sqlite3.Error:
            pass  # a cache that cannot be written only costs time next run
        self._new_units.clear()
        self._new_yaml.clear()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
