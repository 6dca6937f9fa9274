"""Semantic checks on the model: the mistakes Istio users actually hit.

Each check is a small function over one service (`service`), or over what
an environment's services claim (`claims`), reporting into `Diagnostics` at
the span of the value at fault. None of them change the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from compiler import model as m
from compiler.diagnostics import Diagnostics, Note, Span, SpanMap, did_you_mean
from compiler.schema import TRAFFIC_POLICY_FIELDS
from compiler.values import human_duration

def service(svc: m.Service, diags: Diagnostics) -> None:
    """Every per-service check."""
    for check in (_ports, _versions_referenced, _weights, _regexes, _tcp_only, _retry_budget, _port_policies_replace,
                  _ingress_hosts_once, _ingress_paths, _ingress_tls, _external,
                  _route_names, _route_actions, _shadowed_routes, _mirrors, _headers, _cors, _canary_plan):
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


def named_routes(svc: m.Service) -> list[m.Route]:
    """One route per route the policy names, as written (its canary's header route, which
    shares its source, left out)."""
    return [r for r in svc.routes if r.source and r.name == r.source[-1]]


def _traffics(svc: m.Service):
    """(traffic, spec path) of the service, and of each named route that sets its own."""
    yield svc.traffic, ("traffic",)
    for r in named_routes(svc):
        if r.traffic is not None and r.traffic != svc.traffic:
            yield r.traffic, r.source + ("traffic",)


def _versions_referenced(svc: m.Service, diags: Diagnostics) -> None:
    defined = [v.name for v in svc.versions]
    for t, at in _traffics(svc):
        refs: list[tuple[str, tuple]] = []
        if t.shape is m.TrafficShape.SPLIT:
            refs = [(w.version, at + ("split", w.version, "\0key")) for w in t.weights]
        elif t.shape in (m.TrafficShape.STABLE, m.TrafficShape.CANARY):
            refs = [(t.weights[0].version, at + ("stable",))]
            if t.canary:
                refs.append((t.canary.version, at + ("canary", "version")))
        for name, path in refs:
            if svc.version(name) is None:
                span = svc.spans.key_at(path[:-1]) if path[-1] == "\0key" else svc.spans.at(path)
                diags.error("traffic.unknown-version", f"version {name!r} is not defined in `versions`{_hint(name, defined)}", span)
        if t.canary and t.canary.version == t.stable:
            diags.error("traffic.canary-is-stable", f"the canary version {t.stable!r} is also the stable version", svc.spans.at(at + ("canary", "version")))


#: `meshc canary` runs every few minutes; an analysis over less than this sees noise, not a trend.
MIN_ANALYSIS_MS = 60_000


def _canary_plan(svc: m.Service, diags: Diagnostics) -> None:
    """A schedule rises; an analysis has steps to gate, over a minute at least."""
    plan = svc.traffic.plan
    if plan is None:
        return
    at = ("traffic", "canary")
    if not plan.steps and svc.spans.key_at(at + ("analysis",)) is not None:
        diags.error("canary.analysis-without-steps", "an analysis gates the steps of a schedule, and this canary has "
                    "none: add `steps` (the weights to move through)", svc.spans.key_at(at + ("analysis",)))
    for i in range(1, len(plan.steps)):
        if plan.steps[i] <= plan.steps[i - 1]:
            diags.error("canary.steps-fall", f"steps rise, one weight per run: {plan.steps[i]} after {plan.steps[i - 1]}",
                        svc.spans.at(at + ("steps", i)), Note("the step before", svc.spans.at(at + ("steps", i - 1))))
    if plan.interval_ms is not None and plan.interval_ms < MIN_ANALYSIS_MS:
        diags.error("canary.interval", f"an analysis interval of {human_duration(plan.interval_ms)} is shorter than a minute: "
                    "too few requests to tell a failing canary from noise", svc.spans.at(at + ("analysis", "interval")))


def _hint(name: str, defined: list[str]) -> str:
    if not defined:
        return " (this service defines no versions)"
    return did_you_mean(name, defined, f"; defined: {', '.join(defined)}")


def _weights(svc: m.Service, diags: Diagnostics) -> None:
    for t, at in _traffics(svc):
        if t.shape is m.TrafficShape.SPLIT:
            total = sum(w.weight for w in t.weights)
            if total != 100:
                parts = " + ".join(f"{w.version} {w.weight}" for w in t.weights)
                diags.error("traffic.split-sum", f"split weights must sum to 100, but {parts} = {total}", svc.spans.key_at(at + ("split",)))


#: Envoy refuses a regex whose RE2 program is larger than this (runtime `re2.max_program_size.error_level`).
RE2_MAX_PROGRAM_SIZE = 100
#: RE2's words for what Python's `re` accepts and RE2 does not (by the start of its message),
#: said the way users search for it.
_RE2_WORDS = (("invalid perl operator: (?=", "RE2 has no look-around"), ("invalid perl operator: (?!", "RE2 has no look-around"),
              ("invalid perl operator: (?<", "RE2 has no look-around"), ("invalid perl operator: (?>", "RE2 has no atomic groups"),
              ("bad repetition operator: ", "RE2 has no possessive quantifiers"),
              ("invalid escape sequence: \\Z", "RE2 spells it \\z"),
              *((f"invalid escape sequence: \\{d}", "RE2 has no back-references") for d in "123456789"))


def _regexes(svc: m.Service, diags: Diagnostics) -> None:
    for what, pattern, path in _regexes_of(svc):
        problem = re2_problem(pattern)
        if problem:
            diags.error("match.regex", f"{what}: regex {pattern!r} {problem}", svc.spans.at(path))


def _regexes_of(svc: m.Service):
    """(what, pattern, spec path) of every regex a service's policy holds, each once."""
    for h in svc.traffic.match:
        if h.kind is m.MatchKind.REGEX:
            yield f"header {h.header!r}", h.value, ("traffic", "canary", "match", "headers", h.header, "regex")
    yield from _cors_regexes(svc.cors, ())
    for r in named_routes(svc):
        match = r.source + ("match",)
        if r.match.path and r.match.path.kind is m.MatchKind.REGEX:
            yield "path", r.match.path.value, match + ("path", "regex")
        for h in r.match.headers:
            if h.kind is m.MatchKind.REGEX:
                yield f"header {h.header!r}", h.value, match + ("headers", h.header, "regex")
        for q in r.match.query:
            if q.kind is m.MatchKind.REGEX:
                yield f"query parameter {q.name!r}", q.value, match + ("query", q.name, "regex")
        if r.rewrite and r.rewrite.regex is not None:
            yield "rewrite", r.rewrite.regex, r.source + ("rewrite", "regex", "match")
        if r.cors != svc.cors:
            yield from _cors_regexes(r.cors, r.source)
        if r.traffic is not None and r.traffic != svc.traffic:
            for h in r.traffic.match:
                if h.kind is m.MatchKind.REGEX:
                    yield f"header {h.header!r}", h.value, r.source + ("traffic", "canary", "match", "headers", h.header, "regex")


def _cors_regexes(cors: m.Cors | None, at: tuple):
    for i, origin in enumerate(cors.allow_origins if cors else ()):
        if origin.kind is m.MatchKind.REGEX:
            yield "CORS origin", origin.value, at + ("cors", "allowOrigins", i, "regex")


def re2_problem(pattern: str) -> str | None:
    """Why RE2 as Envoy runs it refuses `pattern` (in words), else None."""
    import re2  # google-re2: the engine itself, not a Python re look-alike

    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        words = next((w for prefix, w in _RE2_WORDS if reason.startswith(prefix)), None)
        return f"is refused by RE2 (Envoy's engine): {reason}" + (f" ({words})" if words else "")
    if compiled.programsize > RE2_MAX_PROGRAM_SIZE:
        return (f"compiles to an RE2 program of size {compiled.programsize}, more than the {RE2_MAX_PROGRAM_SIZE} "
                "Envoy accepts; simplify it (fewer counted repetitions or alternatives)")
    return None


# -- routes --------------------------------------------------------------------------------


def _route_names(svc: m.Service, diags: Diagnostics) -> None:
    """Each route is named as written, its canary's header route `NAME-canary-match`, the
    service's own `canary-match` and `default`: no two may share a name (Envoy and Istio
    would both take them for one)."""
    first: dict[str, m.Route] = {}
    for r in svc.routes:
        if r.name in first and first[r.name].source != r.source or r.name in first and not r.source:
            owner = first[r.name]
            span = svc.spans.key_at(r.source) if r.source else svc.spans.key_at(("traffic",))
            made = "the name of the service's own route" if not owner.source else f"also the name made for route {owner.source[-1]!r}"
            diags.error("routes.duplicate-name", f"route name {r.name!r} is {made}; rename the route",
                        span or svc.spans.key_at(owner.source), Note("that route comes from here", svc.spans.key_at(owner.source or ("traffic",))))
        first.setdefault(r.name, r)


def _route_actions(svc: m.Service, diags: Diagnostics) -> None:
    """A redirect or a direct response sends nothing upstream: what shapes an upstream request
    (rewrite, timeout, retries, fault, mirror) cannot be set on that route."""
    for r in named_routes(svc):
        if r.traffic is not None:
            continue
        action = "redirect" if r.redirect else "directResponse"
        for key in ("rewrite", "timeout", "retries", "fault", "mirror"):
            span = svc.spans.exact(r.source + (key, SpanMap.KEY))
            if span is not None:
                diags.error("routes.action", f"route {r.source[-1]!r}: `{key}` applies to a route that sends traffic upstream, "
                            f"and this route answers with a `{action}`", span, Note(f"`{action}` set here", svc.spans.key_at(r.source + (action,))))


def _shadowed_routes(svc: m.Service, diags: Diagnostics) -> None:
    """A named route that an earlier one always takes first can never match (istioctl does not say)."""
    earlier: list[m.Route] = []
    for r in named_routes(svc):
        for e in earlier:
            if covers(e.match, r.match):
                what = "every request" if e.match.is_everything else "every request this one matches"
                diags.error("routes.shadowed", f"route {r.source[-1]!r} can never match: route {e.source[-1]!r}, tried before it, "
                            f"matches {what}", svc.spans.key_at(r.source),
                            Note(f"route {e.source[-1]!r} is here", svc.spans.key_at(e.source)))
                break
        earlier.append(r)


def covers(a: m.RouteMatch, b: m.RouteMatch) -> bool:
    """Whether every request `b` matches is matched by `a` too (sound: False when unsure)."""
    if not _path_covers(a.path, b.path):
        return False
    if a.methods and not (b.methods and set(b.methods) <= set(a.methods)):
        return False
    if not all(any(bh.header == ah.header and _string_covers(ah, bh) for bh in b.headers) for ah in a.headers):
        return False
    return all(q in b.query for q in a.query)


def _path_covers(a: m.StringMatch | None, b: m.StringMatch | None) -> bool:
    if a is None or a in (m.StringMatch(m.MatchKind.PREFIX, "/"), m.StringMatch(m.MatchKind.REGEX, ".*")):
        return True
    return b is not None and _string_covers(a, b)


def _string_covers(a, b) -> bool:
    """`a` and `b` are matches (kind, value) on one string: does `a` take all that `b` takes?"""
    if a.kind is m.MatchKind.PRESENT:
        return True  # b is a condition on the same header, which it needs present
    if a.kind is m.MatchKind.PREFIX:
        return b.kind in (m.MatchKind.EXACT, m.MatchKind.PREFIX) and b.value.startswith(a.value)
    return a.kind is b.kind and a.value == b.value  # exact, and regex (only when written alike)


def _mirror_holders(svc: m.Service) -> list[tuple[tuple, m.Mirror]]:
    """(spec path, mirror) of the service's mirror and of each named route that sets another."""
    holders = [((), svc.mirror)] + [(r.source, r.mirror) for r in named_routes(svc) if r.mirror != svc.mirror]
    return [(at, mirror) for at, mirror in holders if mirror is not None]


def _mirrors(svc: m.Service, diags: Diagnostics) -> None:
    """A mirror of this service names one of its versions (another service's are `claims`')."""
    for at, mirror in _mirror_holders(svc):
        if mirror.service != svc.key:
            continue
        if mirror.version is None:
            diags.error("mirror.target", "a mirror needs a `version` of this service, or another `service`: "
                        "copying requests to where they already go would send each twice", svc.spans.key_at(at + ("mirror",)))
        elif svc.version(mirror.version) is None:
            defined = [v.name for v in svc.versions]
            diags.error("mirror.unknown-version", f"mirror version {mirror.version!r} is not defined in `versions`{_hint(mirror.version, defined)}",
                        svc.spans.at(at + ("mirror", "version")))


#: Envoy refuses to add, set or remove these (istiod drops them); the host is `rewrite.authority`'s.
_UNTOUCHABLE_HEADERS = ("host",)


def _headers(svc: m.Service, diags: Diagnostics) -> None:
    holders = [((), svc.headers)] + [(r.source, r.headers) for r in named_routes(svc) if r.headers != svc.headers]
    for at, headers in holders:
        if headers is None:
            continue
        for side, ops in (("request", headers.request), ("response", headers.response)):
            for op, names in (("set", [k for k, _ in ops.set]), ("add", [k for k, _ in ops.add]), ("remove", list(ops.remove))):
                for i, name in enumerate(names):
                    if name in _UNTOUCHABLE_HEADERS:
                        path = at + ("headers", side, op) + ((i,) if op == "remove" else (name,))
                        diags.error("headers.host", f"headers.{side}.{op}: Envoy does not let a route change the {name!r} header; "
                                    "set `rewrite.authority` on a route instead", svc.spans.key_at(path) if op != "remove" else svc.spans.at(path))


def _cors(svc: m.Service, diags: Diagnostics) -> None:
    holders = [((), svc.cors)] + [(r.source, r.cors) for r in named_routes(svc) if r.cors != svc.cors]
    for at, cors in holders:
        if cors is not None and cors.max_age_ms is not None and cors.max_age_ms % 1000:
            diags.error("cors.max-age", "cors.maxAge must be whole seconds (the Access-Control-Max-Age header counts seconds)",
                        svc.spans.at(at + ("cors", "maxAge")))


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
    HttpOnly(("routes",), "a named route", lambda s: bool(named_routes(s)), lambda spec: bool(spec["routes"])),
    HttpOnly(("fault",), "fault injection", lambda s: s.fault is not None),
    HttpOnly(("mirror",), "mirroring", lambda s: s.mirror is not None),
    HttpOnly(("headers",), "header rewriting", lambda s: s.headers is not None),
    HttpOnly(("cors",), "a CORS policy", lambda s: s.cors is not None),
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
    for field, what in (("hosts", "ingress host"), ("paths", "ingress path")):
        first: dict[str, int] = {}
        for i, value in enumerate(getattr(svc.ingress, field)):
            if value in first:
                diags.error(f"ingress.{field[:-1]}-conflict", f"{what} {value!r} is listed twice", svc.spans.at(("ingress", field, i)),
                            Note("first listed here", svc.spans.at(("ingress", field, first[value]))))
            first.setdefault(value, i)


#: What a policy of a service outside the mesh may not set (a ServiceEntry has no pods to
#: select, no versions, and meshc gives it no VirtualService): spec field → what it is.
NOT_EXTERNAL = {"versions": "a version", "traffic": "a traffic shape", "routes": "a named route", "ingress": "an ingress",
                 "timeout": "a request timeout", "retries": "retries", "fault": "a fault", "mirror": "a mirror",
                 "headers": "header rewriting", "cors": "a CORS policy", "egress": "an egress list (what it calls)"}


def _external(svc: m.Service, diags: Diagnostics) -> None:
    """`selector` (a mesh service) or `external` (outside it), not both; what an external one takes."""
    at = svc.spans
    if svc.external is None:
        if not svc.selector:
            removed = at.removed_at(("selector",))  # an overlay's `selector: null`
            diags.error("external.selector", "a service needs `selector` (its pods in the mesh) or `external` "
                        "(a host outside it)" + (": this null removes the selector" if removed else ""),
                        removed or at.key_at(("ports",)))
        return
    if svc.selector:
        diags.error("external.selector", "`selector` and `external` exclude each other: a service is in the mesh "
                    "or outside it", at.key_at(("external",)), Note("selector set here", at.key_at(("selector",))))
    given = _mesh_fields(svc)
    for field, what in NOT_EXTERNAL.items():
        if given[field] and at.key_at((field,)) is not None:
            diags.error("external.field", f"{what} applies to a service in the mesh; an external service gets a "
                        "ServiceEntry and a DestinationRule (ports, tls, loadBalancer, connectionPool, "
                        "outlierDetection)", at.key_at((field,)))
    static = svc.external.resolution == "STATIC"
    if static != bool(svc.endpoints.all()):
        diags.error("external.endpoints", "resolution STATIC takes its addresses from the environment's `endpoints`, "
                    "which list none for it" if static else "resolution DNS resolves the host itself: the "
                    "environment's `endpoints` for it would be ignored; use resolution STATIC",
                    at.at(("external", "resolution")) or at.key_at(("external",)))


def _mesh_fields(svc: m.Service) -> dict[str, bool]:
    """Which of NOT_EXTERNAL's fields the service sets."""
    values = {"versions": svc.versions, "traffic": svc.traffic != m.Traffic(), "routes": named_routes(svc),
              "ingress": svc.ingress, "timeout": svc.timeout_ms, "retries": svc.retries, "fault": svc.fault,
              "mirror": svc.mirror, "headers": svc.headers, "cors": svc.cors, "egress": svc.egress is not None}
    return {field: value not in (None, (), [], False) for field, value in values.items()}


def _sidecar_credential(svc: m.Service) -> tuple[str, Span | None] | None:
    """The first `credentialName` a caller's sidecar would use, with its span; None without one."""
    for path, tls in svc.tls_settings():
        if tls.sidecar_credential:
            return tls.sidecar_credential, svc.spans.at(path + ("credentialName",))
    return None


def _ingress_tls(svc: m.Service, diags: Diagnostics) -> None:
    """Port 443 is HTTPS's; a redirect to https needs the https, and takes port 80, so the TLS port is another."""
    ing = svc.ingress
    if ing is not None and ing.port == 443 and ing.tls is None:
        diags.error("ingress.https-without-tls", "ingress port 443 is the HTTPS port, but this ingress has no `tls`: "
                    "clients would send TLS to a plain HTTP server; set `tls` (mode and credentialName), or serve "
                    "plain HTTP on another port", svc.spans.at(("ingress", "port")))
    if ing is None or not ing.https_redirect:
        return
    if ing.tls is None:
        diags.error("ingress.redirect-without-tls", "`httpsRedirect` sends clients to https, which this ingress does "
                    "not serve: set `tls` (mode and credentialName)", svc.spans.key_at(("ingress", "httpsRedirect")))
    elif ing.port == 80:
        diags.error("ingress.redirect-port", "with `httpsRedirect`, port 80 answers every request with a redirect: "
                    "serve TLS on another port (443)", svc.spans.at(("ingress", "port")) or svc.spans.key_at(("ingress",)))


def _ingress_paths(svc: m.Service, diags: Diagnostics) -> None:
    """On its ingress paths the gateway takes a route only within them: a regex path has no
    such form (RE2 has no look-ahead to add `and it starts with /api`)."""
    if svc.ingress is None or not svc.ingress.paths:
        return
    for r in named_routes(svc):
        if r.match.path is not None and r.match.path.kind is m.MatchKind.REGEX:
            diags.error("ingress.path-regex", "a route that matches its path by regex cannot be served under `ingress.paths`: "
                        "the gateway would need both the regex and the path prefix, which one Envoy or Istio path "
                        "match cannot say; match a prefix or an exact path", svc.spans.at(r.source + ("match", "path", "regex")),
                        Note("ingress paths set here", svc.spans.key_at(("ingress", "paths"))))


# -- between services ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    """What one service takes in its environment that no other service may, with the spans
    that name it: carried by every compiled unit, cached or not (`to_json` / `from_json`),
    so the checks between services never need the model.

    `ports` is every (number, is TCP, span) of the service; `ingress` each (host, path
    prefix or None for what no other service takes, ingress port, how it is served (`on port
    443 with TLS SIMPLE (cert)`), span, span of the port) it serves at the gateway, the span
    the path's where there is one; `generated` the `namespace/name` of each object named after it for another
    purpose (the ingress VirtualService `<name>-ingress`), with the span that asked for it.

    Three fields are references rather than claims, checked against the other units for the
    same reason: `versions` names the service's versions, `mirrors` each (service,
    version or None, port, span of the service, span of the version) that this service
    copies requests to in another service, and `egress` each (entry, span) it says it calls.
    `scoped` says whether what it calls is known (it has `egress`, or is outside the mesh and
    has no sidecar; without, it may call anything), and
    `credential` is the (credentialName, span) its callers' sidecars use, if any.
    """

    key: str
    ports: tuple[tuple[int, bool, Span | None], ...] = ()
    ingress: tuple[tuple[str, str | None, int, str, Span | None, Span | None], ...] = ()
    generated: tuple[tuple[str, Span | None], ...] = ()
    versions: tuple[str, ...] = ()
    mirrors: tuple[tuple[str, str | None, int, Span | None, Span | None], ...] = ()
    egress: tuple[tuple[str, Span | None], ...] = ()
    scoped: bool = False
    credential: tuple[str, Span | None] | None = None
    failed: bool = False  # the service did not compile: what it holds is unknown (never cached)

    @classmethod
    def of(cls, svc: m.Service) -> "Claims":
        at = svc.spans.at
        ports = tuple((p.number, not p.is_http, at(("ports", i, "port"))) for i, p in enumerate(svc.ports))
        ingress, generated = (), ()
        if svc.ingress is not None:
            ing, port_span = svc.ingress, at(("ingress", "port")) or svc.spans.key_at(("ingress",))
            how = f"on port {ing.port}" + (f" with {ing.tls}" if ing.tls else "") + (
                ", port 80 redirecting to https" if ing.https_redirect else "")
            paths = [(p, at(("ingress", "paths", j))) for j, p in enumerate(ing.paths)]
            ingress = tuple((h, prefix, ing.port, how, span if prefix else at(("ingress", "hosts", i)), port_span)
                            for i, h in enumerate(ing.hosts) for prefix, span in paths or [(None, None)])
            generated = ((f"{svc.key}-ingress", svc.spans.key_at(("ingress",))),)
        # A mirror to another service copies to the same port of it as the request came in on.
        mirrors = tuple((mirror.service, mirror.version, p.number, at(path + ("mirror", "service")), at(path + ("mirror", "version")))
                        for path, mirror in _mirror_holders(svc) if mirror.service != svc.key
                        for p in svc.ports if p.is_http)
        egress = tuple((entry, at(("egress", i))) for i, entry in enumerate(svc.egress or ()))
        return cls(svc.key, ports, ingress, generated, tuple(v.name for v in svc.versions), mirrors, egress,
                   svc.egress is not None or svc.external is not None, _sidecar_credential(svc))

    def to_json(self) -> list:
        return [self.key, [[n, tcp, _row(s)] for n, tcp, s in self.ports], [[h, p, n, how, _row(s), _row(ps)] for h, p, n, how, s, ps in self.ingress],
                [[g, _row(s)] for g, s in self.generated], list(self.versions),
                [[k, v, n, _row(s), _row(vs)] for k, v, n, s, vs in self.mirrors],
                [[e, _row(s)] for e, s in self.egress], self.scoped,
                None if self.credential is None else [self.credential[0], _row(self.credential[1])]]

    @classmethod
    def from_json(cls, value: list) -> "Claims":
        key, ports, ingress, generated, versions, mirrors, egress, scoped, credential = value
        return cls(key, tuple((n, tcp, _span(s)) for n, tcp, s in ports),
                   tuple((h, p, n, how, _span(s), _span(ps)) for h, p, n, how, s, ps in ingress),
                   tuple((g, _span(s)) for g, s in generated), tuple(versions),
                   tuple((k, v, n, _span(s), _span(vs)) for k, v, n, s, vs in mirrors),
                   tuple((e, _span(s)) for e, s in egress), scoped,
                   None if credential is None else (credential[0], _span(credential[1])))


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
        report = diags.warning if code in _WARNINGS else diags.error
        report(code, message.replace("{where}", where), span, *notes)


#: What `_clashes` finds that is said, not refused.
_WARNINGS = frozenset({"tls.credential-unscoped-callers"})


def _clashes(units: list[Claims]):
    """(code, message, span, notes) of every clash among one environment's services, in mesh order;
    `{where}` in a message stands for the environments it occurs in."""
    yield from _ingress_clashes(units)
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
    yield from _mirror_targets(units)
    yield from _egress_targets(units)
    yield from _credential_callers(units)
    keys = {u.key for u in units}
    for u in units:
        for name, span in u.generated:
            if name in keys:
                yield ("istio.duplicate-object",
                       f"VirtualService {name}, generated for the ingress of {u.key} in {{where}}, is also the name of "
                       f"{name}'s own VirtualService; rename one of the services", span, ())


def _ingress_clashes(units: list[Claims]):
    """One host and path prefix (or the rest of a host) is one service's; the services that
    share a host serve it alike (port, TLS, redirect): the gateway has one server for it; and
    one port is TLS for every host on it or for none (Istio's rule for a gateway's servers)."""
    owner: dict[tuple[str, str | None], tuple[str, Span | None]] = {}
    served: dict[str, tuple[str, str, Span | None]] = {}
    tls_on: dict[int, tuple[str, bool, Span | None]] = {}
    for u in units:
        for host, prefix, port, how, span, how_span in u.ingress:
            what = f"ingress host {host!r}" + (f" path {prefix!r}" if prefix else "")
            first = owner.setdefault((host, prefix), (u.key, span))
            if first[0] != u.key:
                yield ("ingress.host-conflict", f"{what} is claimed by both {first[0]} and {u.key} in {{where}}", span,
                       (Note(f"{first[0]} claims it here", first[1]),))
            first_how = served.setdefault(host, (u.key, how, how_span))
            if first_how[0] != u.key and first_how[1] != how:
                yield ("ingress.serving-conflict", f"ingress host {host!r} is served {how} by {u.key} and {first_how[1]} "
                       f"by {first_how[0]} in {{where}}: services that share a host serve it alike", how_span,
                       (Note(f"{first_how[0]} serves it {first_how[1]} here", first_how[2]),))
            tls = "TLS" in how
            first_tls = tls_on.setdefault(port, (u.key, tls, how_span))
            if first_tls[0] != u.key and first_tls[1] != tls:
                yield ("ingress.port-tls", f"ingress port {port} is {'TLS' if tls else 'plain HTTP'} for {u.key} but "
                       f"{'TLS' if first_tls[1] else 'plain HTTP'} for {first_tls[0]} in {{where}}: a gateway port "
                       "terminates TLS for every host on it or for none", how_span,
                       (Note(f"{first_tls[0]}'s ingress", first_tls[2]),))


def _mirror_targets(units: list[Claims]):
    """A mirror to another service names a service of the environment, one of its versions
    and an HTTP port it has: else Envoy's mirror cluster does not exist and Istio's subset
    does not either."""
    by_key = {u.key: u for u in units}
    for u in units:
        found = {}  # each HTTP port of the service finds the same missing service: report it once
        for key, version, port, span, version_span in u.mirrors:
            target = by_key.get(key)
            if target is not None and target.failed:
                continue  # its own errors are reported; what it would define is unknown
            if target is None:
                found.setdefault(("mirror.unknown-service", span), (
                    f"mirror service {key!r} is not a service in {{where}}{did_you_mean(key, list(by_key))}", ()))
            elif version is not None and version not in target.versions:
                found.setdefault(("mirror.unknown-version", version_span), (
                    f"mirror version {version!r} is not a version of {key} in {{where}}{_hint(version, list(target.versions))}", ()))
            elif not any(n == port and not tcp for n, tcp, _ in target.ports):
                found.setdefault(("mirror.port", span), (
                    f"{key} has no HTTP port {port} in {{where}}: a mirror to another service copies each request "
                    "to that service's port of the number it came in on", (Note(f"{key}'s ports", target.ports[0][2]),)))
        for (code, span), (message, notes) in found.items():
            yield code, message, span, notes


def _egress_targets(units: list[Claims]):
    """What a service says it calls exists: a service of the environment, or a namespace holding one."""
    keys = [u.key for u in units]
    namespaces = {k.split("/")[0] for k in keys}
    for u in units:
        for entry, span in u.egress:
            namespace, _, name = entry.partition("/")
            if name == "*" and namespace not in namespaces:
                yield ("egress.unknown", f"egress {entry!r}: no service is in namespace {namespace!r} in {{where}}"
                       f"{did_you_mean(namespace, sorted(namespaces))}", span, ())
            elif name != "*" and entry not in keys:
                yield ("egress.unknown", f"egress {entry!r} is not a service in {{where}}{did_you_mean(entry, keys)}", span, ())


def _credential_callers(units: list[Claims]):
    """Istio's sidecars take a DestinationRule's `credentialName` only from a rule with a
    `workloadSelector`, in the caller's namespace (without one, only gateways use it): the
    Istio target writes one for each service that lists the service in `egress`. So such a
    service needs callers that say so; a service without `egress` may call it too, and under
    Istio its sidecar originates that TLS without the credential (the Envoy snapshot gives
    the credential to every proxy)."""
    for target in units:
        if target.credential is None or target.failed:
            continue
        name, span = target.credential
        namespace = target.key.split("/")[0]
        callers = [u.key for u in units if u.key != target.key and m.calls([e for e, _ in u.egress], target.key)]
        if not callers:
            yield ("tls.credential-callers",
                   f"credentialName {name!r}: Istio's sidecars use it only through a DestinationRule with their "
                   f"workloadSelector, which meshc writes for each service that lists {target.key} in `egress`, and "
                   f"none does in {{where}}; list {target.key} (or {namespace}/*) in its callers' `egress`", span, ())
            continue
        unscoped = [u.key for u in units if not u.scoped and u.key != target.key and not u.failed]
        if unscoped:
            shown = ", ".join(unscoped[:3]) + (f" and {len(unscoped) - 3} more" if len(unscoped) > 3 else "")
            yield ("tls.credential-unscoped-callers",
                   f"credentialName {name!r} is used by the sidecars of {', '.join(callers)} (they list {target.key} in "
                   f"`egress`) in {{where}}; {shown} {'has' if len(unscoped) == 1 else 'have'} no `egress` and may call "
                   f"{target.key} too: under Istio without this credential, in the Envoy snapshot with it; give "
                   f"{'it' if len(unscoped) == 1 else 'them'} an `egress`", span, ())
