"""Counters and a histogram, rendered in the Prometheus text exposition format.

Owns the server's metric registry. Everything is updated from the server's
one event-loop thread, so there are no locks; gauges that describe current
state (connected proxies, snapshot versions) are computed at scrape time by
the callbacks the server registers.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable

__all__ = ["Metrics"]

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, dict[str, str], float]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _format(name: str, labels: Iterable[tuple[str, str]], value: float) -> str:
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    number = repr(float(value)) if not float(value).is_integer() else str(int(value))
    return f"{name}{{{pairs}}} {number}" if pairs else f"{name} {number}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    """A registry: `inc` counters, `observe` histograms, `gauge` callbacks, `render` text."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, _Histogram]] = defaultdict(dict)
        self._gauges: dict[str, Callable[[], Iterable[Sample]]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        series = self._counters[name]
        key = _labels(labels)
        series[key] = series.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 if never incremented); for tests and the bench."""
        return self._counters.get(name, {}).get(_labels(labels), 0)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        self._histograms[name].setdefault(_labels(labels), _Histogram()).observe(seconds)

    def gauge(self, name: str, samples: Callable[[], Iterable[Sample]]) -> None:
        """Register `samples()`, called at scrape time, yielding (name, labels, value)."""
        self._gauges[name] = samples

    def render(self) -> str:
        lines: list[str] = []
        names = sorted(set(self._help) | set(self._gauges) | set(self._counters) | set(self._histograms))
        for name in names:
            kind, text = self._help.get(name, ("untyped", ""))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in self._gauges:
                lines += [_format(n, sorted(l.items()), v) for n, l, v in self._gauges[name]()]
            for labels, value in sorted(self._counters.get(name, {}).items()):
                lines.append(_format(name, labels, value))
            for labels, hist in sorted(self._histograms.get(name, {}).items()):
                running = 0
                for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), hist.counts):
                    running += count
                    lines.append(_format(f"{name}_bucket", (*labels, ("le", bound)), running))
                lines.append(_format(f"{name}_sum", labels, hist.total))
                lines.append(_format(f"{name}_count", labels, hist.n))
        return "\n".join(lines) + "\n"
