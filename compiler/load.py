"""Loading: find the policy and environment files, parse YAML with positions.

The only stage that reads the repository. Files come in through a `Source`
(a mapping of repo-relative POSIX paths to bytes) so the same pipeline runs
on a working tree or on a git commit's blobs.

YAML is composed with ruamel.yaml's C parser (libyaml): nodes carry line and
column at C speed, and we build plain values plus a `SpanMap` ourselves. That
keeps precise positions without the round-trip loader, and it means no YAML
tag is ever constructed: anything but the core schema's tags is refused.
Scalars resolve by YAML 1.2 rules (`on`, `yes` stay strings).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from compiler.diagnostics import Diagnostics, Span, SpanMap

POLICY_DIR = "policies"
ENVIRONMENT_DIR = "environments"
YAML_SUFFIXES = (".yaml", ".yml")

_CORE = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Source:
    """The input files: repo-relative POSIX path → bytes (policies and environments only)."""

    files: Mapping[str, bytes] = field(default_factory=dict)

    def policy_paths(self) -> list[str]:
        return sorted(p for p in self.files if p.startswith(POLICY_DIR + "/") and p.endswith(YAML_SUFFIXES))

    def environment_paths(self) -> list[str]:
        return sorted(
            p
            for p in self.files
            if p.startswith(ENVIRONMENT_DIR + "/") and p.count("/") == 1 and p.endswith(YAML_SUFFIXES)
        )


def is_input_path(path: str) -> bool:
    """Whether a repo-relative path is one the compiler reads."""
    if not path.endswith(YAML_SUFFIXES):
        return False
    return path.startswith(POLICY_DIR + "/") or (path.startswith(ENVIRONMENT_DIR + "/") and path.count("/") == 1)


def source_from_dir(repo: Path) -> Source:
    """Read the inputs of a working tree. A symlink that leads out of the repo is not read."""
    root = os.fspath(repo)
    real_root = os.path.realpath(root)
    files: dict[str, bytes] = {}
    for top in (POLICY_DIR, ENVIRONMENT_DIR):
        start = os.path.join(root, top)
        if os.path.islink(start) and not _inside(real_root, start):
            continue
        for rel, is_link in _walk(root, top):
            if not is_input_path(rel):
                continue
            path = os.path.join(root, rel)
            if is_link and not _inside(real_root, path):
                continue
            files[rel] = _read(path, rel)
    return Source(files)


def _read(path: str, rel: str) -> bytes:
    """A regular file's bytes. Anything else named like an input (a FIFO would block the read
    forever, a device never end) is refused, and a failure names the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO does not wait for a writer
    except OSError as exc:
        raise OSError(exc.errno, f"{rel}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{rel}: not a regular file")
        parts = [os.read(fd, st.st_size + 1)]  # all of it, but for a file still growing
        while parts[-1]:
            parts.append(os.read(fd, 1 << 16))
        return b"".join(parts)
    finally:
        os.close(fd)


def _inside(real_root: str, path: str) -> bool:
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _walk(root: str, top: str) -> Iterator[tuple[str, bool]]:
    """(repo-relative POSIX path, is a symlink) of every file below `top`, sorted, hidden ones
    left out. Symlinked directories below `top` are not walked (as os.walk follows none): a
    symlink to a directory is neither walked nor a file, any other entry that is not a
    directory is one. One scandir per directory, whose entries know whether they are links."""
    start = os.path.join(root, top)
    if not os.path.isdir(start):
        return
    yield from _walk_dir(start, top)


def _walk_dir(path: str, rel: str) -> Iterator[tuple[str, bool]]:
    try:
        with os.scandir(path) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:  # as os.walk: a directory that cannot be listed holds nothing
        return
    dirs = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            if not entry.is_symlink():
                dirs.append(entry)
        else:
            yield f"{rel}/{entry.name}", entry.is_symlink()
    for entry in dirs:
        yield from _walk_dir(entry.path, f"{rel}/{entry.name}")


@dataclass(frozen=True)
class Document:
    """One parsed YAML file: plain values (dict/list/str/int/float/bool/None) and where each came from."""

    path: str
    data: object
    spans: SpanMap
    sha: str  # SHA-256 of the file's bytes

    def to_json(self) -> dict:
        """Plain JSON (for the cache): spans as [path-list, file, line, col] rows."""
        spans = [[list(p), *span] for p, span in self.spans.items()]
        return {"path": self.path, "data": self.data, "spans": spans, "sha": self.sha}

    @classmethod
    def from_json(cls, value: dict) -> "Document":
        rows = value["spans"]
        spans = SpanMap.from_rows(lambda: rows)
        return cls(value["path"], value["data"], spans, value["sha"])


def parse(path: str, content: bytes, diags: Diagnostics) -> Document | None:
    """Parse one single-document YAML file; report problems into `diags` and return None on any."""
    # Imported here: a re-compile served from the cache parses nothing and skips ~35 ms of imports.
    from ruamel.yaml import CSafeLoader
    from ruamel.yaml.error import MarkedYAMLError, YAMLError
    from ruamel.yaml.reader import ReaderError

    sha = hashlib.sha256(content).hexdigest()
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        diags.error("yaml.encoding", f"file is not UTF-8 ({exc.reason} at byte {exc.start})", Span(path, 1, 1))
        return None
    if _nesting_bound(text) > _COMPOSE_SAFE:
        deep = _too_deep_event(text)
        if deep is not None:
            diags.error("yaml.too-deep", f"value nested deeper than {MAX_DEPTH} levels", Span(path, deep.line + 1, deep.column + 1))
            return None
    loader = CSafeLoader(text)
    try:
        node = loader.get_single_node()
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = Span(path, mark.line + 1, mark.column + 1) if mark else Span(path, 1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        diags.error("yaml.syntax", f"YAML syntax error: {problem}", span)
        return None
    except ReaderError as exc:  # a character YAML forbids: no mark, a byte offset
        line, col = _line_col(content, exc.position)
        diags.error("yaml.syntax", f"YAML error: character U+{exc.character:04X} is not allowed ({exc.reason})", Span(path, line, col))
        return None
    except YAMLError as exc:  # anything else without a mark: one line, at the top
        diags.error("yaml.syntax", f"YAML error: {' '.join(str(exc).split())}", Span(path, 1, 1))
        return None
    finally:
        loader.dispose()
    if node is None:
        diags.error("yaml.empty", "file is empty; expected one YAML document", Span(path, 1, 1))
        return None
    spans: dict = {}
    before = len(diags)
    try:
        data = _Builder(path, spans, diags, text).value(node, ())
    except _TooBig:
        diags.error("yaml.too-big", f"the document expands to more than {MAX_VALUES:,} values (through aliases?)", Span(path, 1, 1))
        return None
    except _TooDeep as exc:
        at = _cycle_start(node, exc.path)
        if at is not None:
            diags.error("yaml.alias-cycle", "this value contains an alias of itself; YAML data here must be a tree", Span(path, at.start_mark.line + 1, at.start_mark.column + 1))
        else:
            diags.error("yaml.too-deep", f"value nested deeper than {MAX_DEPTH} levels", Span(path, exc.node.start_mark.line + 1, exc.node.start_mark.column + 1))
        return None
    if len(diags) > before:
        return None
    return Document(path, data, SpanMap(spans), sha)


def _line_col(content: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of a byte offset, lines broken as libyaml breaks them."""
    before = content[:offset].decode("utf-8", "replace")
    breaks = list(re.finditer("\r\n|[\r\n\x85\u2028\u2029]", before))
    start = breaks[-1].end() if breaks else 0
    return len(breaks) + 1, len(before) - start + 1


_MERGE, _KEY_TAGS = _CORE + "merge", (_CORE + "str", _CORE + "int")

# Aliases let a few bytes expand into billions of values ("billion laughs"); no policy needs this many.
MAX_VALUES = 100_000

# Mappings and lists nested deeper than this are refused. A policy nests about 7 levels
# (spec.traffic.canary.match.headers.NAME.exact), an environment's patch value with a Kubernetes
# fragment perhaps 20: 64 is three times what anything real needs, and keeps every stage that
# recurses over a document (this builder, cerberus, the overlay merge, json, the YAML emitter) a few
# hundred frames deep at most, far below Python's recursion limit of 1,000.
MAX_DEPTH = 64

# ruamel's C composer recurses on the C stack, a frame per level, unchecked: ~65,000 levels
# overflow an 8 MB stack (SIGSEGV) and ~3,500 a 1 MB one. A text that cannot nest deeper than
# this (by `_nesting_bound`) is composed straight away; any other is first read as an event
# stream, which libyaml parses without recursing, for its true depth.
_COMPOSE_SAFE = 10_000


def _nesting_bound(text: str) -> int:
    """An upper bound, cheap (C-speed string scans), on how deep `text` can nest collections.

    Block collections: down a chain of nested ones the column grows at least every second level
    (a list under a key may start in the key's column), and a column is at most a line long.
    Flow collections: each opens with `[` or `{`, and an entry `a: b` of a flow list is a mapping
    of its own without a `{`: two levels per `[`, one per `{`.
    """
    longest = max(map(len, text.split("\n")))
    return 2 * (longest + 1) + 2 * text.count("[") + text.count("{") + 1


def _too_deep_event(text: str):
    """The start mark of the first collection nested deeper than MAX_DEPTH, else None.
    Reads parser events (libyaml's parser keeps its own stack; nothing here recurses)."""
    from ruamel.yaml import CSafeLoader
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.events import CollectionEndEvent, CollectionStartEvent, StreamEndEvent

    loader = CSafeLoader(text)
    depth = 0
    try:
        while True:
            event = loader.get_event()
            if event is None or isinstance(event, StreamEndEvent):
                return None
            if isinstance(event, CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return event.start_mark
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
    except YAMLError:  # composing reports it, at the same place: no deeper than this so far
        return None
    finally:
        loader.dispose()


class _TooBig(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, node, path: tuple):
        self.node, self.path = node, path


def _cycle_start(root, path: tuple):
    """The first node met twice walking from `root` down `path` (an alias inside its own
    anchor's value composes into a cycle), else None. Only on the error path."""
    seen, node = set(), root
    for step in path:
        if id(node) in seen:
            return node
        seen.add(id(node))
        if node.id == "mapping":
            node = next(v for k, v in node.value if k.value == step)
        else:
            node = node.value[step]
    return node if id(node) in seen else None


class _Builder:
    """Turns composed nodes into plain values, recording a span per path."""

    def __init__(self, path: str, spans: dict, diags: Diagnostics, text: str = ""):
        self.path, self.spans, self.diags, self.text = path, spans, diags, text
        self.budget = MAX_VALUES

    def span(self, node) -> Span:
        return Span(self.path, node.start_mark.line + 1, node.start_mark.column + 1)

    def value(self, node, path: tuple):
        self.budget -= 1
        if self.budget < 0:
            raise _TooBig
        self.spans[path] = self.span(node)
        tag = node.tag or ""
        if node.id == "mapping":
            if tag != _CORE + "map":
                return self.refuse(node, tag)
            if len(path) >= MAX_DEPTH:
                raise _TooDeep(node, path)
            return self.mapping(node, path)
        if node.id == "sequence":
            if tag != _CORE + "seq":
                return self.refuse(node, tag)
            if len(path) >= MAX_DEPTH:
                raise _TooDeep(node, path)
            return [self.value(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.scalar(node, tag)

    def mapping(self, node, path: tuple) -> dict:
        out: dict = {}
        for key_node, value_node in node.value:
            key_tag = key_node.tag  # a property that formats ruamel's Tag on every read
            if key_tag == _MERGE:
                self.diags.error("yaml.merge-key", "YAML merge keys (<<) are not supported; write the keys out", self.span(key_node))
                continue
            if key_node.id != "scalar" or key_tag not in _KEY_TAGS:
                self.diags.error("yaml.key", "mapping keys must be plain strings", self.span(key_node))
                continue
            key = key_node.value
            if key in out:
                first = self.spans[path + (key, SpanMap.KEY)]
                self.diags.error("yaml.duplicate-key", f"duplicate key {key!r} (first defined at line {first.line})", self.span(key_node))
                continue
            self.spans[path + (key, SpanMap.KEY)] = self.span(key_node)
            out[key] = self.value(value_node, path + (key,))
        return out

    def scalar(self, node, tag: str):
        text = node.value
        if tag == _CORE + "str":
            return text
        try:
            if tag == _CORE + "int":
                return _int(text)
            if tag == _CORE + "float":
                number = _float(text)
                if not math.isfinite(number):   # .nan passes every min/max; neither JSON nor Envoy has either
                    self.diags.error("yaml.number", f"{_shown(text)} is not a finite number, which no field takes; "
                                     "quote it if it is a string", self.span(node))
                    return None
                return number
        except _TooLarge:
            self.diags.error("yaml.number", f"integer {_shown(text)} has more than {MAX_INT_DIGITS} digits; no field takes a number this large", self.span(node))
            return None
        except ValueError:
            self.diags.error("yaml.number", f"{_shown(text)} is not a number this loader reads; quote it if it is a string", self.span(node))
            return None
        if tag == _CORE + "bool":
            return text.lower() == "true"
        if tag == _CORE + "null":
            return None
        if tag == _CORE + "timestamp" and self.text[node.start_mark.index:node.start_mark.index + 1] != "!":
            return text  # YAML 1.2's core schema has no timestamps: `from: 2026-12-24T00:00:00Z` is a string
        return self.refuse(node, tag)

    def refuse(self, node, tag: str):
        shown = tag.replace(_CORE, "!!")
        self.diags.error("yaml.tag", f"YAML tag {shown!r} is not allowed; only plain mappings, lists and scalars are", self.span(node))
        return None


_INT_BASES = {"0x": 16, "0o": 8, "0b": 2}


# Python refuses to print an int of more decimal digits than sys.get_int_max_str_digits() (4,300
# by default, 640 at the lowest it can be set): str() raises ValueError, and a diagnostic or an
# output quoting such a number crashed meshc. Larger ones are refused here, with one limit on
# every machine. Big integers below it still load (a patch value may carry one).
MAX_INT_DIGITS = 640
_INT_LIMIT = 10**MAX_INT_DIGITS


class _TooLarge(ValueError):
    pass


def _int(text: str) -> int:
    """An integer as ruamel's resolver tagged it (YAML 1.2: decimal, 0x, 0o; 1.1's 0b too)."""
    t = text.replace("_", "")
    sign = -1 if t.startswith("-") else 1
    t = t.lstrip("+-")
    base = _INT_BASES.get(t[:2].lower())
    digits = (t[2:] if base else t).lstrip("0") or "0"
    if len(digits) > 4 * MAX_INT_DIGITS:  # too large in any base: told without converting a megabyte of digits
        raise _TooLarge
    value = sign * int(digits, base or 10)
    if not -_INT_LIMIT < value < _INT_LIMIT:
        raise _TooLarge
    return value


def _shown(text: str) -> str:
    """A scalar quoted in a message: a long one cut short."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}… ({len(text):,} characters)"


def _float(text: str) -> float:
    t = text.replace("_", "").lower()
    if t in (".inf", "+.inf"):
        return float("inf")
    if t == "-.inf":
        return float("-inf")
    if t == ".nan":
        return float("nan")
    return float(t)
