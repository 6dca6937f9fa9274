"""Emission: the one YAML and one JSON serializer, and atomic writes of `rendered/`.

A leaf: it owns the types it serialises (`OutputFile`, `Lowered`, `Piece`, `Deferred`,
`Rendered`) and imports nothing from the compiler, so every stage may use it.

Nothing is serialised before it is read: an environment's files are a `Rendered`
mapping that makes a file's bytes when first asked, each file has a `content_key`
computed without serialising it (pieces by their keys), and a piece may hold its bytes
in a `PieceStore` (the cache) until then. So a re-compile that knows a file is
unchanged (`write_rendered`'s `known`) neither builds nor reads it.

YAML goes through libyaml's C emitter (PyYAML's CSafeDumper): sorted keys,
block style, LF, a final newline. PyYAML resolves scalars by YAML 1.1, so
strings such as "on" or "yes" come out quoted and Kubernetes (also 1.1)
reads them back as strings. JSON is orjson with sorted keys, two-space indent
and a final newline.

`write_rendered` stages what differs from the tree already there (a new
environment whole; in one that exists, each directory of files that changed,
built again with its unchanged files hard-linked) and swaps each staged
directory or file in atomically (renameat2's RENAME_EXCHANGE), so a reader
never sees half a directory; where the kernel lacks it, two renames leave an
entry missing for the instant between them. The replacement of the whole of
`rendered/` is all-or-nothing: a failed step undoes the steps before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Mapping

import orjson
import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

_UNPARSED = object()


@dataclass(frozen=True)
class OutputFile:
    """One file to write: YAML documents (a list), or one JSON value, or its bytes already."""

    path: str  # relative to rendered/<env>/
    content: object
    format: str  # "yaml" (content is a list of documents) | "json" (a value, or bytes serialised by the target)


@dataclass(frozen=True)
class Lowered:
    """What a target made of one environment: its files, and the diagnostics it raised."""

    files: tuple[OutputFile, ...]
    diagnostics: tuple = field(default=())  # compiler.diagnostics.Diagnostic


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    """libyaml's emitter, never writing anchors: a reviewer reads every value where it applies."""

    def ignore_aliases(self, data) -> bool:
        return True

    _resolved: dict = {}  # (scalar, implicit) → tag; shared, and emptied past _RESOLVED_LIMIT

    def resolve(self, kind, value, implicit):
        if kind is not ScalarNode:
            return super().resolve(kind, value, implicit)
        key = (value, implicit)
        tag = self._resolved.get(key)
        if tag is None:
            if len(self._resolved) > _RESOLVED_LIMIT:
                self._resolved.clear()
            tag = self._resolved[key] = super().resolve(kind, value, implicit)
        return tag


_REPRESENTER = _Dumper(io.StringIO())

KUSTOMIZATION = "kustomization.yaml"
_RESOLVED_LIMIT = 100_000


class Piece:
    """Output serialised once, then spliced into every file that holds it as bytes.

    A re-compile rebuilds each environment's Envoy files from thousands of
    resources that did not change; parsing them back from the cache only to
    serialise them again would cost more than all its other work. So a
    resource (or a YAML document) is lowered into a piece, once, in the worker
    that computed it. `text` is its rendering: a YAML document, or JSON as
    `json_bytes` indents it at `depth` (a top-level array's items are at depth
    1); spliced in at that depth it is copied verbatim, deeper it is indented
    further. A piece may hold a run of values (`many`): several items of one
    list, or several documents of one file; a service's clusters are one
    piece. `canonical` (YAML pieces) is the documents' canonical JSON.
    `value` parses it back, only when something must look inside (a patch, a
    domain list to filter, a test). Pieces are immutable: build a new one to
    change a value.
    """

    __slots__ = ("_text", "depth", "_canonical", "many", "_value", "_key", "_store")

    def __init__(self, text: bytes | None, depth: int = 0, canonical: bytes | None = None, many: bool = False,
                 value=_UNPARSED, key: str | None = None, store: "PieceStore | None" = None):
        self._text = text  # None: still in `store`, under `key`
        self.depth = depth
        self._canonical = canonical
        self.many = many
        self._value = value
        self._key = key  # `key`, when whoever made the piece knew it already (the cache does)
        self._store = store

    @property
    def text(self) -> bytes:
        if self._text is None:
            self._fetch()
        return self._text

    @property
    def canonical(self) -> bytes | None:
        if self._text is None:
            self._fetch()
        return self._canonical

    def _fetch(self) -> None:
        self._canonical, self._text = self._store.one(self._key)

    @property
    def key(self) -> str:
        """SHA-256 (hex) of everything the piece is: the same key is the same piece."""
        if self._key is None:
            h = hashlib.sha256(b"%d %d\n" % (self.depth, self.many))
            h.update(self.canonical or b"")
            h.update(b"\n")  # canonical JSON never holds a raw newline
            h.update(self.text)
            self._key = h.hexdigest()
        return self._key

    @classmethod
    def json(cls, value, depth: int) -> "Piece":
        """One JSON value, for `depth`."""
        return cls(_pretty(value).replace(b"\n", _INDENT[depth]) if depth else _pretty(value), depth, value=value)

    @classmethod
    def json_items(cls, values: list, depth: int) -> "Piece | None":
        """Several items of one list, at `depth` (≥ 1); None for no items (a list holds no empty run)."""
        if not values:
            return None
        text = _INDENT_COMMA[depth].join(_pretty(v).replace(b"\n", _INDENT[depth]) for v in values)
        return cls(text, depth, many=True, value=values)

    @classmethod
    def yaml(cls, documents: list) -> "Piece":
        """Every YAML document of one file, as one `yaml.dump_all` would write them."""
        canonicals = [canonical_json(doc) for doc in documents]  # a list's canonical JSON is its items'
        text = b"---\n".join(_yaml_document(doc, c) for doc, c in zip(documents, canonicals))
        return cls(text, 0, b"[" + b",".join(canonicals) + b"]", many=True, value=documents)

    @property
    def value(self):
        """The value, or for a run the list of its values."""
        if self._value is _UNPARSED:
            if self.canonical is not None:
                self._value = _loads(self.canonical)
                if self.many:
                    _remember_yaml(self._value, self.text)
            else:
                self._value = _loads(b"[" + self.text + b"]" if self.many else self.text)
        return self._value

    def __eq__(self, other) -> bool:
        return (type(other) is Piece and self.text == other.text and self.depth == other.depth
                and self.canonical == other.canonical and self.many == other.many)

    def __hash__(self) -> int:
        return hash(self.text)

    def __reduce__(self):  # to a worker's parent: the bytes, not the parsed value
        return Piece, (self.text, self.depth, self.canonical, self.many)

    def __repr__(self) -> str:
        return f"Piece({self.text[:60]!r}..., depth={self.depth})"


class PieceStore:
    """Where a piece made without its bytes (`Piece(None, ..., key=, store=)`) reads them:
    the re-compile cache, which loads a piece's bytes only when a file that holds it is
    serialised or its value is read. Both calls raise `errors.CacheDamaged` when a piece
    is not there."""

    def one(self, key: str) -> tuple[bytes | None, bytes]:
        """(canonical, text) of the piece stored under `key`."""
        raise NotImplementedError

    def many(self, keys: list[str]) -> dict[str, tuple[bytes | None, bytes]]:
        """The same for several, in one read."""
        raise NotImplementedError


def fetch_pieces(value) -> None:
    """Read, store by store in one go each, the bytes of every piece in `value` not yet read
    (what serialising `value` would otherwise read one by one)."""
    waiting: dict[int, tuple[PieceStore, list[Piece]]] = {}
    _waiting(value, waiting)
    for store, pieces in waiting.values():
        found = store.many([p._key for p in pieces])
        for p in pieces:
            p._canonical, p._text = found[p._key]


def _waiting(value, into: dict) -> None:
    kind = type(value)
    if kind is Piece:
        if value._text is None:
            into.setdefault(id(value._store), (value._store, []))[1].append(value)
    elif kind is dict:
        for v in value.values():
            if type(v) in _CONTAINERS:
                _waiting(v, into)
    elif kind is list or kind is tuple:
        for v in value:
            if type(v) in _CONTAINERS:
                _waiting(v, into)
    elif kind is Deferred:
        _waiting(value.args, into)


def _yaml_document(document, canonical: bytes) -> bytes:
    """One document's YAML, memoised per process by its canonical JSON: the same Service in
    every environment renders once."""
    text = _YAML_MEMO.get(canonical)
    if text is None:
        if len(_YAML_MEMO) >= _YAML_MEMO_LIMIT:
            _YAML_MEMO.clear()
        text = _YAML_MEMO[canonical] = yaml_bytes([document])
    return text


def _remember_yaml(documents: list, text: bytes) -> None:
    """Seed the memo with the documents of a YAML piece parsed back, so a file built from them
    and more (an ingress's Gateway, a Sidecar, a patched copy) renders only what is new. The
    text splits at its separators exactly: a line `---` never occurs inside a document (YAML
    forbids it in any scalar, `c-forbidden`, and every document here is a mapping)."""
    texts = text.split(b"\n---\n")
    if len(texts) != len(documents):
        return
    last = len(texts) - 1
    for i, (document, part) in enumerate(zip(documents, texts)):
        if len(_YAML_MEMO) >= _YAML_MEMO_LIMIT:
            _YAML_MEMO.clear()
        _YAML_MEMO.setdefault(canonical_json(document), part if i == last else part + b"\n")


_YAML_MEMO: dict[bytes, bytes] = {}
_YAML_MEMO_LIMIT = 50_000
_INDENT = [b"\n" + b"  " * d for d in range(32)]
_INDENT_COMMA = [b"," + i for i in _INDENT]


def plain(value):
    """`value` with every piece replaced by the value it holds (a run by its values): plain JSON data."""
    kind = type(value)
    if kind is Piece:
        return value.value
    if kind is dict:
        return {k: plain(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        out = []
        for v in value:
            if type(v) is Piece and v.many:
                out.extend(v.value)
            else:
                out.append(plain(v))
        return out
    return value


def file_bytes(file: OutputFile) -> bytes:
    """An output file's bytes: YAML documents joined by `---` lines (exactly what one
    `yaml.dump_all` writes), or JSON as `json_bytes` writes it. Pieces are spliced in."""
    if file.format == "yaml":
        content = file.content
        if len(content) == 1 and type(content[0]) is Piece:  # a service's file: its documents' piece
            return content[0].text
        return b"---\n".join(d.text if type(d) is Piece else yaml_bytes([d]) for d in content)
    if file.format == "json":
        if type(file.content) is bytes:  # serialised by its target already
            return file.content
        if type(file.content) is Deferred:  # serialised by its target's rule, when asked
            return file.content()
        return json_bytes(file.content)
    raise ValueError(f"unknown output format {file.format!r}")


class Deferred:
    """A file's bytes as `render(*args)`, made only when something reads them: a re-compile
    that knows the file did not change (`content_key`) never pays for a 70 MB splice and
    its hash. `render` must be a pure, module-level function of `args` (its name is part
    of the key), and `args` plain data and pieces."""

    __slots__ = ("render", "args")

    def __init__(self, render: Callable[..., bytes], *args):
        self.render, self.args = render, args

    def __call__(self) -> bytes:
        return self.render(*self.args)


def content_key(file: OutputFile) -> str:
    """What `file_bytes(file)` reads, pieces by their keys, as a string: two files of one path
    with one key have the same bytes (under one compiler: the caller keys its record with the
    fingerprint). A file that is one piece (a service's Istio file) is `P` and the piece's key;
    any other, SHA-256 (hex) of its path, format and content. Computed without serialising a
    piece; raises TypeError for a value `file_bytes` could not write either."""
    content = file.content
    if type(content) is list and len(content) == 1 and type(content[0]) is Piece and file.format == "yaml":
        return "P" + content[0].key  # file_bytes writes its text, whatever the path
    h = hashlib.sha256(b"%s\0%s\0" % (file.path.encode(), file.format.encode()))
    try:
        h.update(orjson.dumps(content, default=_marked, option=orjson.OPT_SORT_KEYS))
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the slower walk has no limit
        h.update(b"\0slow")
        _feed(h.update, content)
    return h.hexdigest()


def _marked(value) -> orjson.Fragment:
    """A piece (or a deferred file) in `content_key`'s JSON: a NUL and a tag, which no JSON
    orjson writes can hold (it escapes NUL in strings), then its key."""
    if type(value) is Piece:
        return orjson.Fragment(b"\0P" + value.key.encode())
    if type(value) is Deferred:
        return orjson.Fragment(b"\0D" + _render_name(value) + b"\0" + orjson.dumps(value.args, default=_marked,
                                                                                   option=orjson.OPT_SORT_KEYS))
    raise TypeError(f"no content key for {type(value).__name__}")


def _render_name(value: "Deferred") -> bytes:
    return f"{value.render.__module__}.{value.render.__qualname__}".encode()


def _feed(update, value) -> None:
    """`value` into the hash, each kind tagged and each length given, so no two values feed alike."""
    kind = type(value)
    if kind is Piece:
        update(b"P" + value.key.encode())
    elif kind is dict:
        update(b"{%d:" % len(value))
        for k in sorted(value):
            _feed(update, k)
            _feed(update, value[k])
    elif kind is list or kind is tuple:
        update(b"[%d:" % len(value))
        for v in value:
            _feed(update, v)
    elif kind is str:
        data = value.encode()
        update(b"s%d:" % len(data) + data)
    elif kind is bool:
        update(b"T" if value else b"F")
    elif kind is int:
        update(b"i%d;" % value)
    elif value is None:
        update(b"N")
    elif kind is float:
        update(b"f" + repr(value).encode() + b";")
    elif kind is bytes:
        update(b"b%d:" % len(value))
        update(value)
    elif kind is Deferred:
        name = _render_name(value)
        update(b"D%d:" % len(name) + name)
        _feed(update, value.args)
    else:
        raise TypeError(f"no content key for {kind.__name__}")


_CONTAINERS = frozenset((Piece, dict, list, tuple, Deferred))


class Rendered(Mapping):
    """One environment's files, path → bytes in path order, each serialised when first read
    (then kept): a write that knows a file is unchanged never serialises it. `key(path)` is
    its `content_key`."""

    def __init__(self, files: Mapping[str, OutputFile]):
        self._files = dict(sorted(files.items()))
        self._bytes: dict[str, bytes] = {}
        self._keys: dict[str, str] = {}

    def __getitem__(self, path: str) -> bytes:
        data = self._bytes.get(path)
        if data is None:
            file = self._files[path]
            fetch_pieces(file.content)
            data = self._bytes[path] = file_bytes(file)
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, path) -> bool:
        return path in self._files

    def key(self, path: str) -> str:
        key = self._keys.get(path)
        if key is None:
            key = self._keys[path] = content_key(self._files[path])
        return key


def yaml_bytes(documents: list) -> bytes:
    """The bytes `yaml.dump_all(documents, sort_keys=True, ...)` gives, with our Dumper.

    PyYAML's representer is pure Python and generic; plain data needs none of
    its dispatch, so nodes are built here and handed straight to libyaml's
    emitter (~25% faster). Scalar resolution (which strings need quotes) is
    PyYAML's own, memoised per value.
    """
    stream = io.StringIO()
    dumper = _Dumper(stream, default_flow_style=False, allow_unicode=True, width=1 << 16, sort_keys=True)
    dumper.open()
    for doc in documents:
        dumper.serialize(_node(doc))
    dumper.close()
    return stream.getvalue().encode("utf-8")


_STR, _INT, _FLOAT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


def _node(value):
    kind = type(value)
    if kind is str:
        return ScalarNode(_STR, value)
    if kind is dict:
        return MappingNode(_MAP, [(ScalarNode(_STR, k), _node(v)) for k, v in sorted(value.items())], flow_style=False)
    if kind is list:
        return SequenceNode(_SEQ, [_node(v) for v in value], flow_style=False)
    if kind is bool:
        return ScalarNode(_BOOL, "true" if value else "false")
    if kind is int:
        return ScalarNode(_INT, str(value))
    if value is None:
        return ScalarNode(_NULL, "null")
    if kind is float:
        return ScalarNode(_FLOAT, _Dumper.represent_float(_REPRESENTER, value).value)
    raise TypeError(f"cannot emit {kind.__name__} as YAML")


def json_bytes(value) -> bytes:
    """Two-space indent, sorted keys, UTF-8, final newline: the bytes `json.dumps(value,
    indent=2, sort_keys=True, ensure_ascii=False) + "\\n"` would give, 30× faster (Python's
    C encoder is bypassed whenever `indent` is set). Pieces inside are spliced in as they are."""
    return b"".join((json_text(value), b"\n"))


def json_text(value) -> bytes:
    """`json_bytes` without the final newline (and without copying megabytes to add it)."""
    try:
        return orjson.dumps(_spliced(value, 0), option=_INDENTED)
    except orjson.JSONEncodeError:  # integers beyond 64 bits: the standard library has no limit
        return json.dumps(plain(value), indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")


def canonical_json(value) -> bytes:
    """Compact, sorted-key JSON: the bytes a YAML document's identity is taken over."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


_INDENTED = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


def _pretty(value) -> bytes:
    """A plain value's `json_bytes` without the final newline."""
    try:
        return orjson.dumps(value, option=_INDENTED)
    except orjson.JSONEncodeError:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _spliced(value, depth: int):
    """`value` with each piece an `orjson.Fragment` of its text, indented for `depth` (orjson
    writes a fragment verbatim, so the indent is ours). Only containers are rebuilt."""
    kind = type(value)
    if kind is Piece:
        if value.depth == depth:
            return orjson.Fragment(value.text)
        if value.depth > depth:
            raise ValueError(f"a piece made for depth {value.depth} cannot go at depth {depth}")
        return orjson.Fragment(value.text.replace(b"\n", b"\n" + b"  " * (depth - value.depth)))
    if kind is dict:
        return {k: _spliced(v, depth + 1) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [_spliced(v, depth + 1) for v in value]
    return value


def _loads(data: bytes):
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # integers beyond 64 bits
        return json.loads(data)


Outputs = Mapping[str, Mapping[str, bytes]]  # environment → (path inside rendered/<env>/ → bytes)


FileStat = tuple[int, int, int]  # (inode, size, mtime in ns): what a file written here still has if untouched


def file_stat(st: os.stat_result) -> FileStat:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def write_rendered(out_dir: Path, outputs: Outputs, prune: bool = False,
                   known: Mapping[str, Mapping[str, FileStat]] | None = None) -> dict[str, dict[str, FileStat]]:
    """Replace `out_dir/<env>` for each environment in `outputs`: all of them, or none.
    → each written environment's files, path → `file_stat` as this write leaves them.

    `known` (environment → path → `file_stat`) is what the caller knows the directory
    holds already: files this module wrote (the stats it returned then) with the bytes
    `outputs` has for them now. A file whose stat is still the one known is taken as the
    same without reading it (or serialising what `outputs` holds for it, when that is a
    `Rendered`); any other is compared byte by byte. A file changed in place keeping its
    inode, size and modification time to the nanosecond would go unnoticed; `--check`
    (`stale_files`) never uses `known`.

    Everything new is staged first, in a hidden `.<env>.new-*` directory beside
    the environments (a failure there changes nothing). An environment seen for
    the first time (or whose directory is a planted symlink, or not 0755) is
    built there whole. One that exists is compared with what it should hold,
    file by file, and only what differs is staged (`_Delta`): each directory
    of files that changes is built again (its unchanged files hard-linked from
    the old one), each changed file of a directory that holds directories is
    staged alone. Then, one atomic rename or exchange at a time, each staged
    tree, directory or file is swapped in, each entry no longer produced is
    moved aside and, with `prune`, each environment directory that is no
    longer compiled (it holds a kustomization.yaml and is not in `outputs`) is
    renamed aside. A re-compile that changes one policy therefore makes a few
    swaps and writes a few files, however many services the repository has.

    Each of those steps is journalled; if any fails, the steps done so far are
    undone, last first (RENAME_EXCHANGE is its own inverse, a rename is undone
    by the rename back), what was staged is removed and the error is raised:
    `out_dir` is again exactly as it was (but for a killed run's leftovers,
    which every run first sweeps away). Only once every step has succeeded is
    what they replaced, by then hidden in `.<env>.new-*` / `.<env>.old-*`,
    deleted; that undoes nothing, and whatever it fails to delete a later run
    removes (once ten minutes old, like a killed run's).

    All-or-nothing is not one atomic step: a reader during the swaps sees each
    directory it opens whole, from one compile or the other (`envoy/`, which
    `meshc serve` reads through one directory handle, is always one
    compile's), but may see some directories or environments new and others
    old (and, where renameat2 is missing, an entry missing between its two
    renames).

    If undoing fails too, the first error is still the one raised: an OSError
    becomes a `RollbackError` (an OSError with the first error's errno, the
    first error as its cause), anything else gets a note; the message adds, for
    each environment that could not be put back, why and where what it held
    before is, and nothing of those environments is deleted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    staged: dict[str, str] = {}
    journal: list[_Step] = []
    stats: dict[str, dict[str, FileStat]] = {env: {} for env in outputs}
    known = known or {}
    try:
        for env in outputs:
            staged[env] = tempfile.mkdtemp(prefix=f".{env}.new-", dir=out_dir)
        moves = [_stage(Path(staged[env]), out_dir / env, files, known.get(env) or {}, stats[env])
                 for env, files in outputs.items()]
        for env, env_moves in zip(outputs, moves):
            for kind, src, dst in env_moves:
                if kind == "put":
                    _swap(src, dst, journal, env=out_dir / env)
                else:  # "drop": what is no longer produced goes aside, into the staging directory
                    _rename(journal, src, dst, target=out_dir / env, old=dst)
        if prune:
            for stale in sorted(_env_dirs(out_dir) - set(outputs)):
                _rename(journal, out_dir / stale, _aside(out_dir / stale), target=out_dir / stale)
    except BaseException as error:
        broken = _roll_back(journal)
        for env, staging in staged.items():
            if out_dir / env not in broken:
                shutil.rmtree(staging, ignore_errors=True)
        if not broken:
            raise
        message = _not_put_back(broken, journal, {out_dir / env: Path(s) for env, s in staged.items()})
        if isinstance(error, OSError):
            raise RollbackError(error.errno, f"{error.strerror or error}; {message}") from error
        error.add_note(message)
        raise
    for step in journal:
        if step.old is not None:
            _discard(step.old)
    for staging in staged.values():
        _discard(Path(staging))
    return stats


class RollbackError(OSError):
    """Writing `rendered/` failed, and putting some environments back as they were failed too."""


class _Step:
    """One atomic step of the replacement, undoable: `src` renamed to `dst`, or the two exchanged."""

    __slots__ = ("exchange", "src", "dst", "target", "old")

    def __init__(self, exchange: bool, src: Path, dst: Path, target: Path, old: Path | None):
        self.exchange, self.src, self.dst = exchange, src, dst
        self.target = target  # the out_dir/<env> the step is part of replacing or pruning
        self.old = old  # where what the step replaced is once it is done, if this step moved it


def _swap(staging: Path, target: Path, journal: list[_Step], env: Path | None = None) -> None:
    """Put `staging` in `target`'s place (as part of replacing `env`, by default `target`
    itself), journalling each step; what it replaced (a directory, a file, or a planted
    symlink, dangling or not) ends up in one step's `old`."""
    env = target if env is None else env
    if not os.path.lexists(target):
        _rename(journal, staging, target, target=env)
    elif _exchange(str(staging), target):  # one atomic step: the target never goes missing
        journal.append(_Step(True, staging, target, env, old=staging))
    else:
        aside = _aside(target)
        _rename(journal, target, aside, target=env, old=aside)
        _rename(journal, staging, target, target=env)


def _rename(journal: list[_Step], src: Path, dst: Path, target: Path, old: Path | None = None) -> None:
    os.rename(src, dst)  # one system call: it happened, or nothing did
    journal.append(_Step(False, src, dst, target, old=dst if src == target else old))


def _roll_back(journal: list[_Step]) -> dict[Path, OSError]:
    """Undo `journal`, last step first. → the targets that could not be put back, with why
    (a target's earlier steps are left alone once one of its undos failed)."""
    broken: dict[Path, OSError] = {}
    for step in reversed(journal):
        if step.target in broken:
            continue
        try:
            if step.exchange:
                if not _exchange(str(step.src), step.dst):
                    raise OSError(0, "renameat2 would not exchange back", str(step.src), None, str(step.dst))
            else:
                os.rename(step.dst, step.src)
        except OSError as exc:
            broken[step.target] = exc
    return broken


def _not_put_back(broken: dict[Path, OSError], journal: list[_Step], staged: Mapping[Path, Path]) -> str:
    details = []
    for target, exc in broken.items():
        steps = [step for step in journal if step.target == target and step.old is not None]
        whole = [step.old for step in steps if target in (step.src, step.dst)]
        if whole:
            where = f"its previous tree is in {whole[0]}"
        elif steps:  # replaced in parts: each part's previous entry is in the staging directory, or beside it
            places = sorted({str(staged[target]) if step.old.parent == staged.get(target) else str(step.old) for step in steps})
            where = f"what it held before is in {', '.join(places)}"
        else:
            where = "it did not exist before"
        details.append(f"{target}: {exc.strerror or exc}, {where}")
    return "putting back what was replaced failed too, so these are not as they were: " + "; ".join(details)


def _aside(target: Path) -> Path:
    """A fresh hidden name beside `target` for its previous tree (random, so no leftover collides)."""
    return target.parent / f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}"


def _discard(path: Path) -> None:
    """Delete what is at `path` (a tree, a file, a symlink: never followed), ignoring failures."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _stage(staging: Path, target: Path, files: Mapping[str, bytes], known: Mapping[str, FileStat],
           stats: dict[str, FileStat]) -> list[tuple[str, Path, Path]]:
    """Stage what replacing `target` with `files` needs, under `staging`, each file's stat into
    `stats`. → the moves that apply it, in order: ("put", staged, target entry) or ("drop",
    target entry, aside)."""
    tree = _Dir.of(files)
    if not _is_ours(target):
        _fill(str(staging), tree.items(), files, stats)
        return [("put", staging, target)]
    return _Delta(staging, files, known, stats).of(tree, target)


def _is_ours(path: Path) -> bool:
    """A real directory (not a symlink) with the mode meshc gives its directories."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == _DIR_MODE


_DIR_MODE = 0o755


class _Dir:
    """The tree `files` make: each directory's files (name → path in `files`) and subdirectories."""

    __slots__ = ("files", "dirs")

    def __init__(self):
        self.files: dict[str, str] = {}
        self.dirs: dict[str, _Dir] = {}

    @classmethod
    def of(cls, files: Mapping[str, bytes]) -> "_Dir":
        """Raises FileExistsError where one name is both a file and a directory. Reads no bytes."""
        root = cls()
        nodes = {"": root}
        for rel in files:
            parent, _, name = rel.rpartition("/")
            node = nodes.get(parent)
            if node is None:
                node = cls._at(parent, nodes)
            node.files[name] = rel
        for rel, node in nodes.items():
            for name in node.files.keys() & node.dirs.keys():
                raise FileExistsError(errno.EEXIST, "both a file and a directory", f"{rel}/{name}".lstrip("/"))
        return root

    @classmethod
    def _at(cls, rel: str, nodes: dict) -> "_Dir":
        head, _, name = rel.rpartition("/")
        parent = nodes.get(head) or cls._at(head, nodes)
        node = nodes[rel] = parent.dirs[name] = cls()
        return node

    def items(self, prefix: str = ""):
        """(path relative to this directory, path in `files`) of every file below it."""
        for name, rel in self.files.items():
            yield prefix + name, rel
        for name, sub in self.dirs.items():
            yield from sub.items(f"{prefix}{name}/")


class _Delta:
    """What differs between an existing tree and the one it should become, staged.

    The old tree is read one directory at a time through descriptors, never
    following a symlink (a pull request can plant one): an entry that is not
    what it should be (a symlink, a FIFO, a directory where a file belongs) is
    replaced like a file whose bytes differ, and nothing outside is ever
    linked in. A directory that holds only files is the unit of change: if
    any of its files differs, or it holds something else, it is built again
    whole (a reader of it sees one compile's files, never a mix). In a
    directory that holds directories, each changed file is staged alone.
    """

    def __init__(self, staging: Path, files: Mapping[str, bytes], known: Mapping[str, FileStat], stats: dict[str, FileStat]):
        self.staging = staging
        self.files, self.known, self.stats = files, known, stats
        self.moves: list[tuple[str, Path, Path]] = []
        self._count = 0
        self._view = memoryview(bytearray(_CHUNK))  # what old files are read into, chunk by chunk

    def of(self, tree: _Dir, target: Path) -> list[tuple[str, Path, Path]]:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self._visit(tree, target, fd)
        finally:
            os.close(fd)
        return self.moves

    def _name(self) -> Path:
        self._count += 1
        return self.staging / str(self._count)

    def _visit(self, node: _Dir, target: Path, fd: int) -> None:
        with os.scandir(fd) as it:
            old = {e.name: e for e in it}
        if not node.dirs:
            same = {n for n, rel in node.files.items() if self._same(fd, old.get(n), n, rel)}
            if len(same) < len(node.files) or len(old) > len(same):
                self.moves.append(("put", self._rebuilt(node, fd, same), target))
            return
        for name, sub in node.dirs.items():
            entry = old.get(name)
            if entry is not None and entry.is_dir(follow_symlinks=False) and stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) == _DIR_MODE:
                sub_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    self._visit(sub, target / name, sub_fd)
                finally:
                    os.close(sub_fd)
            else:
                staged = self._name()
                os.mkdir(staged, _DIR_MODE)
                _fill(str(staged), sub.items(), self.files, self.stats)
                self.moves.append(("put", staged, target / name))
        for name, rel in node.files.items():
            if not self._same(fd, old.get(name), name, rel):
                staged = self._name()
                self.stats[rel] = _write(os.fspath(staged), self.files[rel], None)
                self.moves.append(("put", staged, target / name))
        for name in sorted(old.keys() - node.files.keys() - node.dirs.keys()):
            self.moves.append(("drop", target / name, self._name()))

    def _rebuilt(self, node: _Dir, old_fd: int, same: set[str]) -> Path:
        """A directory of `node`'s files: those in `same` hard-linked from the old one, the rest written."""
        staged = self._name()
        os.mkdir(staged, _DIR_MODE)
        os.chmod(staged, _DIR_MODE)
        fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for name, rel in node.files.items():
                if name in same:  # its stat is in `stats` already: a link keeps inode, size and mtime
                    os.link(name, name, src_dir_fd=old_fd, dst_dir_fd=fd, follow_symlinks=False)
                else:
                    self.stats[rel] = _write(name, self.files[rel], fd)
        finally:
            os.close(fd)
        return staged


    def _same(self, dir_fd: int, entry: os.DirEntry | None, name: str, rel: str) -> bool:
        """Whether the old directory's `name` is a regular file holding exactly what `rel` should
        (a symlink or FIFO there is never followed nor waited on: it is simply not the same):
        known by its stat where `known` has it, else read and compared. Its stat goes into `stats`."""
        if entry is None or not entry.is_file(follow_symlinks=False):
            return False
        expected = self.known.get(rel)
        if expected is not None:
            try:
                now = file_stat(entry.stat(follow_symlinks=False))
            except OSError:
                return False
            if now == expected:
                self.stats[rel] = now
                return True
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:
            return False
        try:
            if not self._holds(fd, self.files[rel]):
                return False
            self.stats[rel] = file_stat(os.fstat(fd))
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def _holds(self, fd: int, content: bytes) -> bool:
        """Whether the file open at `fd` holds `content`, read into one reused buffer and
        compared where each chunk lands: an Envoy file of 100 MB is not copied into fresh
        memory to compare it (whose page faults cost more than the reading). A regular file
        gives all it has to one read, so a short read is its end."""
        size, offset, view = len(content), 0, self._view
        while True:
            want = min(size + 1 - offset, len(view))
            got = os.readv(fd, [view[:want]])
            if not content.startswith(view[:got], offset):
                return False
            offset += got
            if got < want:
                return offset == size


_CHUNK = 1 << 22


def _write(name: str, content: bytes, dir_fd: int | None) -> FileStat:
    with open(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd), "wb") as f:
        f.write(content)
        f.flush()
        return file_stat(os.fstat(f.fileno()))


def _fill(staging: str, entries, files: Mapping[str, bytes], stats: dict[str, FileStat]) -> None:
    """Write under the empty directory `staging` (directories 0755) each (path under it, path
    in `files`) of `entries`, its stat into `stats`."""
    new_dirs = {"": os.open(staging, os.O_RDONLY | os.O_DIRECTORY)}
    try:
        for where, rel in entries:
            parent, _, name = where.rpartition("/")
            if parent not in new_dirs:
                _make_dirs(parent, new_dirs)
            stats[rel] = _write(name, files[rel], new_dirs[parent])
        os.chmod(staging, _DIR_MODE)
    finally:
        for fd in new_dirs.values():
            os.close(fd)


def _make_dirs(rel: str, made: dict[str, int]) -> None:
    head, _, name = rel.rpartition("/")
    if head not in made:
        _make_dirs(head, made)
    os.mkdir(name, _DIR_MODE, dir_fd=made[head])
    os.chmod(name, _DIR_MODE, dir_fd=made[head])  # whatever the umask: the same tree on every machine
    made[rel] = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=made[head])


def _exchange(a: str, b: Path) -> bool:
    """Swap two directory entries atomically (Linux renameat2 RENAME_EXCHANGE). False where
    unsupported (no renameat2, or the filesystem refuses the flag); any other failure raises."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), a, None, str(b))


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove_leftovers(out_dir: Path) -> None:
    """Staging and old directories a killed compile left behind (older than ten minutes, so
    a concurrent compile's own are never touched)."""
    cutoff = time.time() - 600
    for p in out_dir.glob(".*"):
        if p.is_dir() and (".new-" in p.name or ".old-" in p.name) and p.stat().st_mtime < cutoff:
            shutil.rmtree(p, ignore_errors=True)


def _env_dirs(out_dir: Path) -> set[str]:
    if not out_dir.is_dir():
        return set()
    return {p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / KUSTOMIZATION).is_file()}


def stale_files(out_dir: Path, outputs: Outputs, all_envs: bool) -> list[str]:
    """What differs between `out_dir` and `outputs`, as `rendered/...: reason` lines (empty when current)."""
    out_dir = Path(out_dir)
    problems = []
    for env, files in sorted(outputs.items()):
        on_disk = _read_tree(out_dir / env)
        for rel in sorted(set(files) | set(on_disk)):
            shown = f"{out_dir.name}/{env}/{rel}"
            if rel not in on_disk:
                problems.append(f"{shown}: missing")
            elif rel not in files:
                problems.append(f"{shown}: not produced by the compiler (stale)")
            elif on_disk[rel] != files[rel]:
                problems.append(f"{shown}: differs from the compiled output")
    if all_envs:
        for env in sorted(_env_dirs(out_dir) - set(outputs)):
            problems.append(f"{out_dir.name}/{env}/: no environment file compiles to it (stale)")
    return problems


def _read_tree(root: Path) -> dict[str, bytes | None]:
    """Every file below `root`: regular files' bytes, None for anything else (a symlink, a FIFO),
    which is never followed nor read and so never equals what the compiler writes."""
    if not root.is_dir() or root.is_symlink():
        return {}
    out: dict[str, bytes | None] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not stat.S_ISREG(os.lstat(path).st_mode):
                out[rel] = None
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, "rb") as f:
                out[rel] = f.read()
    return out
