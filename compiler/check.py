"""Semantic checks on the model: the mistakes Istio users actually hit.

Each check is a small function over one service (`service`), or over what
an environment's services claim (`claims`), reporting into `Diagnostics` at
the span of the value at fault. None of them change the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from compiler import model as m
from compiler.diagnostics import Diagnostics, Note, Span, did_you_mean
from compiler.schema import TRAFFIC_POLICY_FIELDS
from compiler.values import human_duration

# What Python's `re` accepts but RE2 (Envoy's engine) refuses: https://github.com/google/re2/wiki/Syntax
_RE2_GROUPS = (("(?=", "look-around"), ("(?!", "look-around"), ("(?<=", "look-around"), ("(?<!", "look-around"),
               ("(?P=", "back-references"), ("(?>", "atomic groups"), ("(?(", "conditional groups"))  # fmt: skip
_COUNTED = re.compile(r"\{\d*(,\d*)?\}")


def service(svc: m.Service, diags: Diagnostics) -> None:
    """Every per-service check."""
    for check in (_ports, _versions_referenced, _weights, _header_regexes, _tcp_only, _retry_budget, _ingress_hosts_once,
                  _port_policies_replace):
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
    return did_you_mean(name, defined, f"; defined: {', '.join(defined)}")


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


@dataclass(frozen=True)
class PolicyHttpOnly:
    """A traffic-policy setting that means nothing without HTTP, wherever the policy is: the
    service's own, a version's or a port's. `path` is within the policy."""

    path: tuple
    what: str
    on_policy: Callable[[m.TrafficPolicy], bool]
    on_spec: Callable[[dict], bool] = lambda policy: True


def _hash_on_request(lb) -> bool:
    return isinstance(lb, dict) and bool(set(lb.get("consistentHash") or {}) & {"header", "cookie"})


def _hashes_requests(lb: m.LoadBalancer | None) -> bool:
    return bool(lb and lb.consistent_hash and lb.consistent_hash.on is not m.HashOn.SOURCE_IP)


def _http_pool_set(cp: m.ConnectionPool | None) -> bool:
    return cp is not None and any(v is not None for v in cp.http_settings)


POLICY_HTTP_ONLY = (
    PolicyHttpOnly(("loadBalancer",), "hashing on a header or cookie", lambda p: _hashes_requests(p.load_balancer),
                   lambda spec: _hash_on_request(spec.get("loadBalancer"))),
    PolicyHttpOnly(("connectionPool", "http"), "HTTP connection-pool settings", lambda p: _http_pool_set(p.connection_pool)),
)

HTTP_ONLY = (
    HttpOnly(("timeout",), "a request timeout", lambda s: s.timeout_ms is not None),
    HttpOnly(("retries",), "retries", lambda s: s.retries is not None),
    HttpOnly(("traffic", "canary", "match"), "a header match", lambda s: bool(s.traffic.match)),
    *(HttpOnly(rule.path, rule.what, lambda s, rule=rule: rule.on_policy(s.policy), rule.on_spec) for rule in POLICY_HTTP_ONLY),
    HttpOnly(("ingress",), "an HTTP ingress", lambda s: s.ingress is not None),
)


def _tcp_only(svc: m.Service, diags: Diagnostics) -> None:
    """HTTP settings where no HTTP flows: anywhere on a TCP-only service; in a TCP port's own policy."""
    every_port = Note("ports declared here", svc.spans.key_at(("ports",)))
    if not svc.http_ports:
        for rule in HTTP_ONLY:
            if rule.on_service(svc):
                diags.error(
                    "tcp.http-setting",
                    f"{rule.what} applies to HTTP traffic only, but every port of this service is TCP",
                    svc.spans.key_at(rule.path),
                    every_port,
                )
        for v in svc.versions:
            if v.policy:
                _policy_tcp_only(svc, v.policy, ("versions", v.name, "policy"), "every port of this service is TCP", every_port, diags)
    for i, port in enumerate(svc.ports):
        if port.policy and not port.is_http:
            note = Note(f"port {port.number} declared here", svc.spans.key_at(("ports", i)))
            _policy_tcp_only(svc, port.policy, ("ports", i, "policy"), f"port {port.number} is TCP", note, diags)


def _policy_tcp_only(svc: m.Service, policy: m.TrafficPolicy, at: tuple, why: str, note: Note, diags: Diagnostics) -> None:
    for rule in POLICY_HTTP_ONLY:
        if rule.on_policy(policy):
            diags.error("tcp.http-setting", f"{rule.what} applies to HTTP traffic only, but {why}", svc.spans.key_at(at + rule.path), note)


def _port_policies_replace(svc: m.Service, diags: Diagnostics) -> None:
    """A port's policy is used instead of the service's on that port, as Istio's portLevelSettings are:
    a field the service sets and the port's policy leaves out is at its default there, not the
    service's value. That surprises Istio users (istio/istio#58297), so it is said where it happens."""
    for i, port in enumerate(svc.ports):
        if port.policy is None:
            continue
        lost = [name for name, own, service in zip(TRAFFIC_POLICY_FIELDS, port.policy.fields, svc.policy.fields)
                if own is None and service is not None]
        if lost:
            names = " and ".join(f"`{name}`" for name in lost)
            diags.warning(
                "ports.policy-replaces",
                f"the policy of port {port.number} replaces the service's there, as Istio's portLevelSettings do: "
                f"the service's {names} {'does' if len(lost) == 1 else 'do'} not apply to port {port.number}; "
                "repeat what it should keep in the port's policy",
                svc.spans.key_at(("ports", i, "policy")),
                *(Note(f"the service's `{name}` is set here", svc.spans.key_at((name,))) for name in lost),
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


def _ingress_hosts_once(svc: m.Service, diags: Diagnostics) -> None:
    if svc.ingress is None:
        return
    first: dict[str, int] = {}
    for i, host in enumerate(svc.ingress.hosts):
        if host in first:
            diags.error("ingress.host-conflict", f"ingress host {host!r} is listed twice", svc.spans.at(("ingress", "hosts", i)),
                        Note("first listed here", svc.spans.at(("ingress", "hosts", first[host]))))
        first.setdefault(host, i)


# -- between services ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    """What one service takes in its environment that no other service may, with the spans
    that name it: carried by every compiled unit, cached or not (`to_json` / `from_json`),
    so the checks between services never need the model.

    `ports` is every (number, is TCP, span) of the service; `ingress_hosts` its (host, span)
    pairs; `generated` the `namespace/name` of each object named after it for another
    purpose (the ingress VirtualService `<name>-ingress`), with the span that asked for it.
    """

    key: str
    ports: tuple[tuple[int, bool, Span | None], ...] = ()
    ingress_hosts: tuple[tuple[str, Span | None], ...] = ()
    generated: tuple[tuple[str, Span | None], ...] = ()

    @classmethod
    def of(cls, svc: m.Service) -> "Claims":
        at = svc.spans.at
        ports = tuple((p.number, not p.is_http, at(("ports", i, "port"))) for i, p in enumerate(svc.ports))
        if svc.ingress is None:
            return cls(svc.key, ports)
        hosts = tuple((h, at(("ingress", "hosts", i))) for i, h in enumerate(svc.ingress.hosts))
        return cls(svc.key, ports, hosts, ((f"{svc.key}-ingress", svc.spans.key_at(("ingress",))),))

    def to_json(self) -> list:
        return [self.key, [[n, tcp, _row(s)] for n, tcp, s in self.ports], [[h, _row(s)] for h, s in self.ingress_hosts],
                [[g, _row(s)] for g, s in self.generated]]

    @classmethod
    def from_json(cls, value: list) -> "Claims":
        key, ports, hosts, generated = value
        return cls(key, tuple((n, tcp, _span(s)) for n, tcp, s in ports), tuple((h, _span(s)) for h, s in hosts),
                   tuple((g, _span(s)) for g, s in generated))


def _row(span: Span | None) -> list | None:
    return None if span is None else list(span)


def _span(value: list | None) -> Span | None:
    return None if value is None else Span(*value)


def claims(by_environment: dict[str, list[Claims]], diags: Diagnostics) -> None:
    """Two services must not take one thing in one environment. Each clash is reported
    once, naming every environment it occurs in (the same policies usually clash in all).

    - an ingress host claimed by two services (Istio merges their gateway routes in an
      order nobody chose; the Envoy gateway can route a host to one service only);
    - a TCP port of one service that another service also uses: the Envoy snapshot binds
      one listener per port and, with no service addresses, cannot tell the connections
      apart (istiod tells them apart by the service VIP);
    - an object generated for one service that is another service's own object.
    """
    found: dict[tuple, list[str]] = {}
    for env, units in by_environment.items():
        for clash in _clashes(units):
            found.setdefault(clash, []).append(env)
    for (code, message, span, notes), envs in found.items():
        where = f"environment {envs[0]!r}" if len(envs) == 1 else "environments " + ", ".join(map(repr, sorted(envs)))
        diags.error(code, message.replace("{where}", where), span, *notes)


def _clashes(units: list[Claims]):
    """(code, message, span, notes) of every clash among one environment's services, in mesh order;
    `{where}` in a message stands for the environments it occurs in."""
    owner: dict[str, tuple[str, Span | None]] = {}
    for u in units:
        for host, span in u.ingress_hosts:
            if host in owner and owner[host][0] != u.key:
                first, first_span = owner[host]
                yield ("ingress.host-conflict", f"ingress host {host!r} is claimed by both {first} and {u.key} in {{where}}", span,
                       (Note(f"{first} claims it here", first_span),))
            owner.setdefault(host, (u.key, span))
    by_port: dict[int, list[tuple[str, bool, Span | None]]] = {}
    for u in units:
        for number, tcp, span in u.ports:
            by_port.setdefault(number, []).append((u.key, tcp, span))
    for number, users in by_port.items():
        if len(users) < 2 or not any(tcp for _, tcp, _ in users):
            continue
        for key, tcp, span in users:
            if not tcp:
                continue
            others = [(k, s) for k, _, s in users if k != key]  # a port listed twice is `_ports`' to report
            if not others:
                continue
            yield ("ports.tcp-shared",
                   f"TCP port {number} is also a port of {', '.join(k for k, _ in others)} in {{where}}: the Envoy snapshot "
                   "binds one listener per port and, without service addresses, cannot tell their connections "
                   "apart; give each TCP service a port of its own",
                   span, tuple(Note(f"{k} uses port {number} here", s) for k, s in others))
    keys = {u.key for u in units}
    for u in units:
        for name, span in u.generated:
            if name in keys:
                yield ("istio.duplicate-object",
                       f"VirtualService {name}, generated for the ingress of {u.key} in {{where}}, is also the name of "
                       f"{name}'s own VirtualService; rename one of the services", span, ())
