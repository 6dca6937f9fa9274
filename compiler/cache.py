"""A content-addressed cache for re-compiles: never a stale result.

The cache lives outside the repository, in the user's cache directory
(`$MESHC_CACHE_DIR`, else `$XDG_CACHE_HOME/meshc`, else `~/.cache/meshc`),
one SQLite file per repository path: nothing a commit can plant is ever read,
and every value is JSON or the bytes meshc itself serialised (never pickle).
Four tables:

- `units`: JSON values keyed by content: one service in one environment,
  compiled (each target's fragment), keyed by SHA-256 of the compiler's
  fingerprint, the policy file's path and bytes and the environment file's
  path and bytes, which is everything that service's output depends on; and
  each valid input file, parsed, keyed by the fingerprint, its path and its
  bytes. Only clean results are stored (no diagnostics), so a cached result
  never hides one.
- `pieces`: the serialised pieces (`emit.Piece`: a resource's or document's
  text, with its depth and canonical JSON) that units refer to, keyed by
  SHA-256 of all of it, so a piece shared by many units (the same cluster in
  every environment) is stored, loaded and held once.
- `results`: what `value` computed (a pure function's JSON result, such as the
  diagnostics of the checks between services), keyed by SHA-256 of the
  fingerprint and a digest of everything the function read; the latest few.
- `written`: what the last `meshc compile` left in an output directory, keyed
  by SHA-256 of the fingerprint and the directory's path: each file's content
  key (`emit.content_key`) and its inode, size and modification time, so the
  next write can tell a file it would write again unchanged by its stat alone
  (`emit.write_rendered`'s `known`), and a digest of the inputs that compile
  read, with its diagnostics, so a run with the same inputs compiles nothing.

The fingerprint hashes the compiler's own source and the versions of the
libraries that shape the output bytes, so any change to either starts over.
A corrupt or unreadable cache is treated as empty.

Its seam with the pipeline: `units(keys, compute, decode)` for compiled units,
`get_json` / `put_json` for parsed input files, `value(key, compute)` for a
pure function's JSON result (the checks between services), and `written` /
`put_written` for the CLI's record of what it wrote. `NoCache`
(`--no-cache`, `validate`) has the same calls and knows nothing, so no stage
asks which one it has.
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
from compiler.emit import Piece, PieceStore
from compiler.errors import CacheDamaged

PRUNE_SLACK = 1000  # unused entries tolerated beyond twice this run's
READ_WAIT = 60  # seconds a read of pieces waits out the save thread's write lock
RESULTS_KEPT = 64  # `value` results kept, the latest stored
WRITTEN_KEPT = 4  # output directories whose last write is remembered


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


def _written_key(out_dir: Path) -> bytes:
    """A record of what was written is this compiler's: another one's content keys mean other bytes."""
    return hashlib.sha256(fingerprint() + b"written\0" + os.fsencode(Path(out_dir).resolve())).digest()


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
        self._store: _Store | None = None
        self._records: dict[bytes, bytes] | None = None  # read on first use (`records`)
        self._pieces: dict[str, Piece] | None = None
        self._new_units: dict[bytes, bytes] = {}
        self._new_pieces: dict[str, Piece] = {}
        self._new_results: dict[bytes, bytes] = {}
        self._new_written: dict[bytes, bytes] = {}
        self._used: set[bytes] = set()
        self._open()

    def _open(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # One thread at a time, but not always the opening one: the CLI saves while it writes rendered/.
            self._db = sqlite3.connect(self.directory / "cache.sqlite", timeout=5, check_same_thread=False)
            # A rollback journal, not WAL: a cold compile saves tens of megabytes at once, and WAL
            # writes them twice (log, then checkpoint); 0.24 s against 0.15 s at 1,000 services.
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=NORMAL")
            for superseded in ("yaml", "blobs"):  # earlier meshc's tables
                self._db.execute(f"DROP TABLE IF EXISTS {superseded}")
            self._db.execute("CREATE TABLE IF NOT EXISTS units (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS pieces (key TEXT PRIMARY KEY, depth INTEGER NOT NULL, "
                             "many INTEGER NOT NULL, canonical BLOB, text BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
            # Reads straight from the page cache, for the whole file: at 10,000 services it holds
            # 340 MB, and a map of 256 MB left a third of the pieces to be read through (0.09 s).
            self._db.execute("PRAGMA mmap_size=2147418112")  # SQLite's largest by default
            self._db.execute("CREATE TABLE IF NOT EXISTS written (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
        except (OSError, sqlite3.Error):
            self._db, self._records, self._pieces = None, {}, {}

    @property
    def records(self) -> dict[bytes, bytes]:
        """Every stored unit and parsed file, key → JSON; read when first asked for (a
        re-compile that finds nothing changed reads only `written`)."""
        if self._records is None:
            self._load()
        return self._records

    @property
    def pieces(self) -> dict[str, Piece]:
        """KEY (hex) → the piece, shared by every unit that has it; listed with `records`."""
        if self._pieces is None:
            self._load()
        return self._pieces

    def _load(self) -> None:
        try:
            records = dict(self._db.execute("SELECT key, value FROM units"))
            # Each piece's bytes stay in the file until something serialises or reads it: a
            # re-compile at 10,000 services lists 64,000 pieces (190 MB) and needs a few of them.
            store = self._store = _Store(self.directory / "cache.sqlite")
            pieces = {key: Piece(None, depth, None, bool(many), key=key, store=store)
                      for key, depth, many in self._db.execute("SELECT key, depth, many FROM pieces")}
        except sqlite3.Error:
            records, pieces = {}, {}
        self._records, self._pieces = records, pieces

    def units(self, keys: list[bytes], compute, decode) -> list:
        """The value of each key: stored ones as `decode(index, stored JSON with its pieces)`,
        the rest from `compute(indexes, pack=True)` → `[(value, record | None)]` in the order
        of `indexes`, each `record` (what `pack_record` made of a clean value) stored."""
        values: list = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            stored = self.get_pieces(key)
            if stored is None:
                missing.append(i)
            else:
                values[i] = decode(i, stored)
        for i, (value, record) in zip(missing, compute(missing, True) if missing else ()):
            values[i] = value
            if record is not None:
                self.put_packed(keys[i], *record)
        return values

    def value(self, key: bytes, compute):
        """The JSON value stored under `key` by this compiler (its fingerprint is part of the
        key), else `compute()`'s, stored: a pure function's result, looked up by a digest of
        everything it reads. Read by key, not loaded with the rest: a run asks for one or two."""
        key = hashlib.sha256(fingerprint() + key).digest()
        try:
            row = self._db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone() if self._db else None
            if row is not None:
                return orjson.loads(row[0])
        except (sqlite3.Error, orjson.JSONDecodeError):  # unreadable or damaged: computed again
            pass
        value = compute()
        self._new_results[key] = orjson.dumps(value)
        return value

    def written(self, out_dir: Path) -> dict:
        """What this compiler last wrote to `out_dir` (`put_written`'s record), {} when unknown."""
        try:
            row = (self._db.execute("SELECT value FROM written WHERE key = ?", (_written_key(out_dir),)).fetchone()
                   if self._db else None)
            value = orjson.loads(row[0]) if row is not None else {}
        except (sqlite3.Error, orjson.JSONDecodeError):
            return {}
        return value if isinstance(value, dict) else {}

    def put_written(self, out_dir: Path, record: dict) -> None:
        """Record what `out_dir` holds after a write (the CLI's JSON: each file's content key
        and stat, and the digest of the inputs that made them), replacing the record `written`
        gave; stored at `save` (nothing here touches the database, which a saving thread may
        be using)."""
        self._new_written[_written_key(out_dir)] = orjson.dumps(record)

    def get_json(self, key: bytes):
        self._used.add(key)
        raw = self.records.get(key)
        if raw is None:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:  # a damaged entry: recompute
            return None

    def put_json(self, key: bytes, value) -> None:
        self._used.add(key)
        try:
            raw = orjson.dumps(value)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits (a patch value): not cached, still compiled
            return
        self.records[key] = raw
        self._new_units[key] = raw

    def get_pieces(self, key: bytes):
        """A value stored by `put_packed`, its pieces restored; None when absent or damaged."""
        value = self.get_json(key)
        if value is None:
            return None
        try:
            return unpack(value, self.pieces)
        except (KeyError, ValueError, TypeError, IndexError):  # a piece went missing, or a damaged record
            return None

    def put_packed(self, key: bytes, record: bytes, pieces: list[tuple[str, Piece]]) -> None:
        """Store what `pack_record` made (in a worker process, say)."""
        self._used.add(key)
        self.records[key] = self._new_units[key] = record
        for ref, piece in pieces:
            piece._key = ref  # hashed where it was packed: a file's content key needs it
            if ref not in self.pieces:
                self.pieces[ref] = self._new_pieces[ref] = piece

    def save(self) -> None:
        """Store what this run added so far. Safe while another thread adds more (the CLI
        records what it wrote while this runs): that is kept for the next `save`."""
        if self._db is None or not (self._new_units or self._new_pieces or self._new_results or self._new_written):
            return
        units, pieces, results, written = self._new_units, self._new_pieces, self._new_results, self._new_written
        self._new_units, self._new_pieces, self._new_results, self._new_written = {}, {}, {}, {}
        # Keep the cache near the size of one repo: entries this run did not use go once they
        # dominate, and with them every piece no remaining unit refers to.
        records = self._records or {}  # not read: nothing was used, and nothing is pruned
        stale = [k for k in records if k not in self._used] if len(records) > 2 * len(self._used) + PRUNE_SLACK else []
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO units VALUES (?, ?)", units.items())
                self._db.executemany("INSERT OR REPLACE INTO pieces VALUES (?, ?, ?, ?, ?)",
                                     ((k, p.depth, p.many, p.canonical, p.text) for k, p in pieces.items()))
                if results:  # the latest RESULTS_KEPT: a result is small, and one run asks for one or two
                    self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?)", results.items())
                    self._db.execute("DELETE FROM results WHERE rowid NOT IN "
                                     "(SELECT rowid FROM results ORDER BY rowid DESC LIMIT ?)", (RESULTS_KEPT,))
                if written:  # one row per output directory; the latest WRITTEN_KEPT
                    self._db.executemany("INSERT OR REPLACE INTO written VALUES (?, ?)", written.items())
                    self._db.execute("DELETE FROM written WHERE rowid NOT IN "
                                     "(SELECT rowid FROM written ORDER BY rowid DESC LIMIT ?)", (WRITTEN_KEPT,))
                if stale:
                    self._db.executemany("DELETE FROM units WHERE key = ?", ((k,) for k in stale))
                    for k in stale:
                        del self.records[k]
                    self._db.executemany("DELETE FROM pieces WHERE key = ?", ((k,) for k in self._orphans()))
        except sqlite3.Error:
            pass  # a cache that cannot be written only costs time next run

    def _orphans(self) -> list[str]:
        """Pieces no unit refers to (after a prune)."""
        referred = set()
        for raw in self.records.values():
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and "pieces" in record:
                referred.update(ref for _, ref in record["pieces"])
        return [k for k in self.pieces if k not in referred]

    def close(self) -> None:
        """Save what this run added, then close."""
        self.save()
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._store is not None:
            self._store.close()


class _Store(PieceStore):
    """The pieces' bytes, read on demand through a connection of their own (the first use
    opens it): they are read while another thread saves through the cache's."""

    BATCH = 500  # keys per query, well under SQLite's limit on parameters

    def __init__(self, path: Path):
        self._path = path
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            # The save thread may hold the write lock for as long as a large save takes (it
            # waits for nothing of ours): waited out, not taken for a damaged cache.
            self._db = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=READ_WAIT,
                                       check_same_thread=False)
            self._db.execute("PRAGMA mmap_size=2147418112")
        return self._db

    def one(self, key: str) -> tuple[bytes | None, bytes]:
        return self.many([key])[key]

    def many(self, keys: list[str]) -> dict[str, tuple[bytes | None, bytes]]:
        found = {}
        try:
            db = self._connection()
            for i in range(0, len(keys), self.BATCH):
                batch = keys[i:i + self.BATCH]
                query = f"SELECT key, canonical, text FROM pieces WHERE key IN ({','.join('?' * len(batch))})"
                found.update((key, (canonical, text)) for key, canonical, text in db.execute(query, batch))
        except sqlite3.Error as exc:
            raise CacheDamaged(f"{self._path}: {exc} (deleting the file starts the cache afresh)") from exc
        missing = [k for k in keys if k not in found]
        if missing:
            raise CacheDamaged(f"{self._path}: {len(missing)} pieces it lists are gone (deleting the file starts the cache afresh)")
        return found

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class NoCache:
    """The cache that holds nothing and keeps nothing: every value is computed, never packed."""

    def units(self, keys: list[bytes], compute, decode) -> list:
        return [value for value, _ in compute(list(range(len(keys))), False)]

    def value(self, key: bytes, compute):
        return compute()

    def get_json(self, key: bytes):
        return None

    def put_json(self, key: bytes, value) -> None:
        pass

    def written(self, out_dir: Path) -> None:
        return None  # unknown: every file is compared, and no content key is computed

    def put_written(self, out_dir: Path, files) -> None:
        pass

    def save(self) -> None:
        pass

    def close(self) -> None:
        pass


def pack_record(value) -> tuple[bytes, list[tuple[str, Piece]]]:
    """`value`, which holds pieces, as a record `{"value": value with each piece null,
    "pieces": [[path, KEY]]}` (JSON bytes) and the pieces it refers to by KEY: what
    `Cache.put_packed` stores, and `unpack` reads back visiting the pieces, not the whole
    value. Made where the value was (a worker process): the pieces travel once, and
    hashing them costs the parent nothing."""
    record, found = _pack(value)
    return orjson.dumps(record), found


def _pack(value) -> tuple[dict, list[tuple[str, Piece]]]:
    found: list = []
    skeleton = _strip(value, [], found)
    refs, pieces = [], []
    for path, piece in found:
        ref = piece_key(piece)
        refs.append([path, ref])
        pieces.append((ref, piece))
    return {"value": skeleton, "pieces": refs}, pieces


def piece_key(piece: Piece) -> str:
    """SHA-256 (hex) of everything a piece is: the same key is the same piece."""
    return piece.key


def _strip(value, path: list, found: list):
    """`value` with its pieces None, each piece and its path appended to `found`."""
    kind = type(value)
    if kind is Piece:
        found.append((list(path), value))
        return None
    if kind is dict:
        out = {}
        for k, v in value.items():
            if type(v) in _NESTED:
                path.append(k)
                out[k] = _strip(v, path, found)
                path.pop()
            else:
                out[k] = v
        return out
    if kind is list or kind is tuple:
        out = []
        for i, v in enumerate(value):
            if type(v) in _NESTED:
                path.append(i)
                out.append(_strip(v, path, found))
                path.pop()
            else:
                out.append(v)
        return out
    return value


_NESTED = frozenset((dict, list, tuple, Piece))


def unpack(record: dict, pieces: dict[str, Piece]):
    """What `pack_record` packed (the record, parsed, is consumed). Raises KeyError when a piece is missing."""
    value = record["value"]
    for path, ref in record["pieces"]:
        piece = pieces[ref]
        if not path:
            return piece
        node = value
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = piece
    return value
