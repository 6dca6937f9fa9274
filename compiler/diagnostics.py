"""Source positions and the diagnostics that point at them.

A `Span` is a place in a file (repo-relative path, 1-based line and column).
A `SpanMap` remembers where each value of a loaded document came from, keyed
by its path inside the document (a tuple of keys and list indices); it is
attached at load and carried through overlays into the model, so a check
far downstream can still point at the line that set a value.

A `Diagnostic` is a user's mistake (or a warning): code, message, span and
notes. Stages collect them all and the pipeline stops after a stage that
reported an error. Rendering is `path:line:col: error: message`, notes as
`path:line:col: note: message` on the following lines.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

Path = tuple  # a path into a document: keys (str) and list indices (int)


class Span(NamedTuple):
    """A place in a file. A named tuple: built by the thousand at load, so it must be cheap."""

    path: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


class SpanMap:
    """Where each value came from: document path → Span.

    Read-only after construction. `at(path)` answers with the span of the
    deepest recorded ancestor, so a value without a span of its own (a
    default, a missing key) still points somewhere useful. Key spans (the
    position of a mapping key rather than its value) live under the path
    with a trailing `KEY` marker.
    """

    KEY = "\0key"
    REMOVED = "\0removed"  # where an overlay's explicit null removed the key at this path
    __slots__ = ("_spans", "_by_first", "_source", "_rows")

    def __init__(self, spans: Mapping[Path, Span] | None = None):
        self._spans = dict(spans or {})
        self._by_first: dict | None = None
        self._source = None
        self._rows = None

    @classmethod
    def deferred(cls, build: Callable[[], dict]) -> "SpanMap":
        """A map whose spans `build()` makes on first use: a part of a large map, which a
        re-compile mostly never reads."""
        spans = cls.__new__(cls)
        spans._by_first = None
        spans._source = build
        spans._rows = None
        return spans

    @classmethod
    def from_rows(cls, rows: Callable[[], list]) -> "SpanMap":
        """A map of the `[path, file, line, col]` rows `rows()` gives (a cached document's).
        Nothing is built until used, and `under` a prefix until then reads only rows: a
        re-compile asks a large environment for a few services' spans."""
        spans = cls.deferred(lambda: {tuple(r[0]): Span(*r[1:]) for r in spans._row_list()})
        spans._rows = rows
        return spans

    def _row_list(self) -> list:
        if callable(self._rows):
            self._rows = self._rows()
        return self._rows

    def __getattr__(self, name: str):
        # Reached only while `_spans` is unset: a deferred map's first use.
        if name != "_spans" or self._source is None:
            raise AttributeError(name)
        self._spans = self._source()
        self._source = None
        return self._spans

    def at(self, path: Path) -> Span | None:
        path = tuple(path)
        while True:
            span = self._spans.get(path)
            if span is not None or not path:
                return span
            path = path[:-1]

    def key_at(self, path: Path) -> Span | None:
        """The span of the mapping key that names `path` (else the value's)."""
        return self._spans.get(tuple(path) + (self.KEY,)) or self.at(path)

    def removed_at(self, path: Path) -> Span | None:
        return self._spans.get(tuple(path) + (self.REMOVED,))

    def exact(self, path: Path) -> Span | None:
        return self._spans.get(tuple(path))

    def items(self) -> Iterable[tuple[Path, Span]]:
        return self._spans.items()

    def items_under(self, prefix: Path) -> list[tuple[Path, Span]]:
        """The (path, span) pairs at or below `prefix`; indexed by first key, built once."""
        if not prefix:
            return list(self._spans.items())
        if self._by_first is None:
            index: dict = {}
            for p, span in self._spans.items():
                if p:
                    index.setdefault(p[0], []).append((p, span))
            self._by_first = index
        group = self._by_first.get(prefix[0], [])
        n = len(prefix)
        return group if n == 1 else [(p, span) for p, span in group if p[:n] == prefix]

    def under(self, prefix: Path) -> "SpanMap":
        """The spans below `prefix`, re-keyed relative to it."""
        n = len(prefix)
        if self._rows is not None:  # not built: filter the rows, when first asked
            keys = list(prefix)
            return SpanMap.from_rows(lambda: [[r[0][n:], *r[1:]] for r in self._row_list() if r[0][:n] == keys])
        prefix = tuple(prefix)
        return SpanMap.deferred(lambda: {p[n:]: s for p, s in self._spans.items() if p[:n] == prefix})

    def children(self, prefix: Path) -> dict[object, "SpanMap"]:
        """`under(prefix + (k,))` for every key k below `prefix`, in one pass over the spans."""
        n = len(prefix)
        prefix = tuple(prefix)
        groups: dict[object, dict] = {}
        for p, s in self._spans.items():
            if len(p) > n and p[:n] == prefix:
                groups.setdefault(p[n], {})[p[n + 1 :]] = s
        return {k: SpanMap(v) for k, v in groups.items()}

    def __len__(self) -> int:
        return len(self._spans)

    def __repr__(self) -> str:
        return f"SpanMap({len(self._spans)} spans)"

    def __getstate__(self):
        return self._spans

    def __setstate__(self, state):
        self._spans = state
        self._by_first = None
        self._source = None
        self._rows = None


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class Note:
    message: str
    span: Span | None = None


@dataclass(frozen=True)
class Diagnostic:
    code: str  # a stable identifier, e.g. "schema.unknown-field"; tests match on it
    message: str
    span: Span | None
    severity: Severity = Severity.ERROR
    notes: tuple[Note, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def render(self) -> str:
        lines = [_line(self.span, self.severity.value, self.message)]
        lines += [_line(n.span, Severity.NOTE.value, n.message) for n in self.notes]
        return "\n".join(lines)

    def sort_key(self):
        span = self.span or Span("", 0, 0)
        return (span.path, span.line, span.col, self.code, self.message)


def _line(span: Span | None, severity: str, message: str) -> str:
    where = f"{span}: " if span else ""
    return f"{where}{severity}: {message}"


@dataclass
class Diagnostics:
    """The collector a stage reports into."""

    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span | None, *notes: Note) -> None:
        self.items.append(Diagnostic(code, message, span, Severity.ERROR, tuple(notes)))

    def warning(self, code: str, message: str, span: Span | None, *notes: Note) -> None:
        self.items.append(Diagnostic(code, message, span, Severity.WARNING, tuple(notes)))

    def extend(self, other: Iterable[Diagnostic]) -> None:
        self.items.extend(other)

    @property
    def has_errors(self) -> bool:
        return self.error_count > 0

    @property
    def error_count(self) -> int:
        return sum(1 for d in self.items if d.is_error)

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def did_you_mean(word: str, choices: Iterable[str], otherwise: str = "") -> str:
    """`"; did you mean 'x'?"` for the closest of `choices`, else `otherwise`: the one
    wording and the one cutoff (difflib's ratio ≥ 0.5: `v3` for `v2`, `LEAST_CONN` for `LEAST_REQUEST`) of every suggestion meshc makes."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else otherwise


def sorted_unique(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Diagnostics in file/line order, each reported once."""
    seen, out = set(), []
    for d in sorted(diagnostics, key=Diagnostic.sort_key):
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out
