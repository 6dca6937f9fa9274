"""Semantic checks on the model: the mistakes Istio users actually hit.

Each check is a small function over one service or over an environment's
services, reporting into `Diagnostics` at the span of the value at fault.
None of them change the model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable

from compiler import model as m
from compiler.diagnostics import Diagnostics, Note
from compiler.values import human_duration

# What Python's `re` accepts but RE2 (Envoy's engine) refuses: https://github.com/google/re2/wiki/Syntax
_RE2_GROUPS = (("(?=", "look-around"), ("(?!", "look-around"), ("(?<=", "look-around"), ("(?<!", "look-around"),
               ("(?P=", "back-references"), ("(?>", "atomic groups"), ("(?(", "conditional groups"))  # fmt: skip
_COUNTED = re.compile(r"\{\d*(,\d*)?\}")


def service(svc: m.Service, diags: Diagnostics) -> None:
    """Every per-service check."""
    for check in (_ports, _versions_referenced, _weights, _header_regexes, _tcp_only, _retry_budget):
        check(svc, diags)


def _ports(svc: m.Service, diags: Diagnostics) -> None:
    for attr, what in (("number", "port"), ("name", "port name")):
        seen: dict = {}
        for i, port in enumerate(svc.ports):
            value = getattr(port, attr)
            if value in seen:
                field = "port" if attr == "number" else "name"
                first = svc.spans.at(("ports", seen[value], field))
                diags.error("ports.duplicate", f"{what} {value} is listed twice", svc.spans.at(("ports", i, field)), Note("first listed here", first))
            seen.setdefault(value, i)


def _versions_referenced(svc: m.Service, diags: Diagnostics) -> None:
    t = svc.traffic
    defined = [v.name for v in svc.versions]
    refs: list[tuple[str, tuple]] = []
    if t.shape is m.TrafficShape.SPLIT:
        refs = [(w.version, ("traffic", "split", w.version, "\0key")) for w in t.weights]
    elif t.shape in (m.TrafficShape.STABLE, m.TrafficShape.CANARY):
        refs = [(t.weights[0].version, ("traffic", "stable"))]
        if t.canary:
            refs.append((t.canary.version, ("traffic", "canary", "version")))
    for name, path in refs:
        if svc.version(name) is None:
            span = svc.spans.key_at(path[:-1]) if path[-1] == "\0key" else svc.spans.at(path)
            diags.error("traffic.unknown-version", f"version {name!r} is not defined in `versions`{_hint(name, defined)}", span)
    if t.canary and t.canary.version == t.stable:
        diags.error("traffic.canary-is-stable", f"the canary version {t.stable!r} is also the stable version", svc.spans.at(("traffic", "canary", "version")))


def _hint(name: str, defined: list[str]) -> str:
    if not defined:
        return " (this service defines no versions)"
    return suggest(name, defined) or f"; defined: {', '.join(defined)}"


def suggest(word: str, choices) -> str:
    """`"; did you mean 'x'?"` for the closest of `choices`, or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _weights(svc: m.Service, diags: Diagnostics) -> None:
    t = svc.traffic
    if t.shape is m.TrafficShape.SPLIT:
        total = sum(w.weight for w in t.weights)
        if total != 100:
            parts = " + ".join(f"{w.version} {w.weight}" for w in t.weights)
            diags.error("traffic.split-sum", f"split weights must sum to 100, but {parts} = {total}", svc.spans.key_at(("traffic", "split")))


def _header_regexes(svc: m.Service, diags: Diagnostics) -> None:
    for h in svc.traffic.match:
        if h.kind is not m.MatchKind.REGEX:
            continue
        span = svc.spans.at(("traffic", "canary", "match", "headers", h.header, "regex"))
        try:
            re.compile(h.value)
        except re.error as exc:
            diags.error("match.regex", f"header {h.header!r}: regex {h.value!r} does not compile: {exc.msg} at position {exc.pos}", span)
            continue
        lacking = re2_lacks(h.value)
        if lacking:
            diags.error("match.regex", f"header {h.header!r}: regex {h.value!r} uses {lacking}, which RE2 (Envoy's engine) does not support", span)


def re2_lacks(pattern: str) -> str | None:
    """The first construct of a (Python-valid) `pattern` that RE2 does not support, in words; else None.

    A small scanner: escapes and character classes are skipped, so `\\(?=` or `[*+]+` raise nothing.
    """
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt and nxt in "123456789":
                return "back-references"
            if nxt == "Z":
                return "\\Z (RE2 spells it \\z)"
            i += 2
            continue
        if c == "[":
            i = _class_end(pattern, i + 1)
            continue
        for opener, words in _RE2_GROUPS:
            if pattern.startswith(opener, i):
                return words
        counted = _COUNTED.match(pattern, i) if c == "{" else None
        end = counted.end() if counted else i + 1
        if (counted or c in "*+?") and pattern[end : end + 1] == "+" and not pattern.startswith("(?", i - 1):
            return "possessive quantifiers"
        i = end
    return None


def _class_end(pattern: str, i: int) -> int:
    """The index after the `]` that closes a character class whose body starts at `i`."""
    if pattern[i : i + 1] == "^":
        i += 1
    if pattern[i : i + 1] == "]":  # a `]` first in the class is a literal
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


@dataclass(frozen=True)
class HttpOnly:
    """A setting that means nothing without an HTTP port: where it lives, how to tell it is set."""

    path: tuple
    what: str
    on_service: Callable[[m.Service], bool]
    on_spec: Callable[[dict], bool] = lambda spec: True  # given the path is present in a spec

    def applies_to_spec(self, spec: dict) -> bool:
        node = spec
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return self.on_spec(spec)


def _hash_on_request(lb) -> bool:
    return isinstance(lb, dict) and bool(set(lb.get("consistentHash") or {}) & {"header", "cookie"})


HTTP_ONLY = (
    HttpOnly(("timeout",), "a request timeout", lambda s: s.timeout_ms is not None),
    HttpOnly(("retries",), "retries", lambda s: s.retries is not None),
    HttpOnly(("traffic", "canary", "match"), "a header match", lambda s: bool(s.traffic.match)),
    HttpOnly(
        ("loadBalancer",),
        "hashing on a header or cookie",
        lambda s: bool(s.load_balancer and s.load_balancer.consistent_hash and s.load_balancer.consistent_hash.on is not m.HashOn.SOURCE_IP),
        lambda spec: _hash_on_request(spec.get("loadBalancer")),
    ),
    HttpOnly(("connectionPool", "http"), "HTTP connection-pool settings", lambda s: bool(s.connection_pool and _http_pool_set(s.connection_pool))),
    HttpOnly(("ingress",), "an HTTP ingress", lambda s: s.ingress is not None),
)


def _http_pool_set(cp: m.ConnectionPool) -> bool:
    return any(v is not None for v in (cp.http1_max_pending_requests, cp.http2_max_requests, cp.max_requests_per_connection, cp.max_retries))


def _tcp_only(svc: m.Service, diags: Diagnostics) -> None:
    if svc.http_ports:
        return
    for rule in HTTP_ONLY:
        if rule.on_service(svc):
            diags.error(
                "tcp.http-setting",
                f"{rule.what} applies to HTTP traffic only, but every port of this service is TCP",
                svc.spans.key_at(rule.path),
                Note("ports declared here", svc.spans.key_at(("ports",))),
            )


def _retry_budget(svc: m.Service, diags: Diagnostics) -> None:
    r = svc.retries
    if svc.timeout_ms is None or r is None or r.per_try_timeout_ms is None or r.attempts == 0:
        return
    total = r.attempts * r.per_try_timeout_ms
    if svc.timeout_ms < total:
        diags.warning(
            "retries.budget",
            f"timeout {human_duration(svc.timeout_ms)} is shorter than attempts × perTryTimeout "
            f"({r.attempts} × {human_duration(r.per_try_timeout_ms)} = {human_duration(total)}): "
            "the request times out before its retries can run",
            svc.spans.at(("timeout",)),
            Note("retries set here", svc.spans.key_at(("retries",))),
        )


def ingress_hosts(services: tuple[m.Service, ...], env: str, diags: Diagnostics) -> None:
    """Two services must not claim the same ingress host in one environment."""
    owner: dict[str, tuple[m.Service, int]] = {}
    for svc in services:
        if svc.ingress is None:
            continue
        for i, host in enumerate(svc.ingress.hosts):
            if host in owner and owner[host][0] is svc:
                j = owner[host][1]
                diags.error(
                    "ingress.host-conflict",
                    f"ingress host {host!r} is listed twice",
                    svc.spans.at(("ingress", "hosts", i)),
                    Note("first listed here", svc.spans.at(("ingress", "hosts", j))),
                )
            elif host in owner:
                first, j = owner[host]
                diags.error(
                    "ingress.host-conflict",
                    f"ingress host {host!r} is claimed by both {first.key} and {svc.key} in environment {env!r}",
                    svc.spans.at(("ingress", "hosts", i)),
                    Note(f"{first.key} claims it here", first.spans.at(("ingress", "hosts", j))),
                )
            else:
                owner[host] = (svc, i)


def generated_names(services: tuple[m.Service, ...], diags: Diagnostics) -> None:
    """An ingress's VirtualService `<name>-ingress` must not be another service's own VirtualService.

    Kustomize and the API server refuse two objects of one kind, namespace and
    name; the ingress objects' generated names are the only ones that can meet.
    """
    keys = {s.key: s for s in services}
    for svc in services:
        other = keys.get(f"{svc.namespace}/{svc.name}-ingress") if svc.ingress else None
        if other is not None:
            diags.error(
                "istio.duplicate-object",
                f"VirtualService {svc.namespace}/{svc.name}-ingress, generated for the ingress of {svc.key}, "
                f"is also the name of {other.key}'s own VirtualService; rename one of the services",
                svc.spans.key_at(("ingress",)),
            )
