"""Route configurations: `PORT` for the mesh's HTTP ports, `http.PORT` for ingress.

A virtual host per service (sidecar) or per ingress host (gateway); its
routes are the VirtualService's: the header-match route to the matched
version first, then the default route (one cluster or weighted clusters).
Every route carries a timeout (`0s` when the policy has none, as istiod: not
Envoy's 15 s default) and istiod's retry policy.
https://www.envoyproxy.io/docs/envoy/latest/api-v3/config/route/v3/route_components.proto
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from operator import itemgetter

from compiler.diagnostics import Diagnostic, Severity
from compiler.emit import Piece
from compiler.model import (ConsistentHash, Cors, Fault, HashOn, HeaderMatch, Headers, MatchKind, Redirect, Retries,
                            Route, RouteMatch, Service)
from compiler.schema import GRPC_STATUSES
from compiler.targets import gateway
from compiler.targets.envoy.common import (CORS_POLICY, FAULT, PREVIOUS_HOSTS, REDIRECT_PORT, cluster_name, default_destinations,
                                           duration, gateway_route_name, span)
from compiler.xds.resources import ROUTES

#: istiod's retry policy for a route whose VirtualService sets no `retries`
#: (pilot/pkg/networking/core/route/retry/retry.go, `defaultPolicy`). Since Istio 1.24 it
#: retries no status code: EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY defaults to true, which
#: drops the 503 (retrying a 503 may run a non-idempotent request twice; istio/istio#50506,
#: PR #52111). `retriable-status-codes` stays in `retry_on`, as istiod leaves it, matching none.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIABLE_STATUS_CODES: tuple[int, ...] = ()
DEFAULT_NUM_RETRIES = 2


def lower(service: Service) -> tuple[list[dict], dict | None]:
    """One service's virtual hosts: per HTTP port, and at the gateway.

    → (`[{"port", "virtual_host"}]` in the service's port order; None without
    ingress, else `{"port", "hosts", "paths", "blocks": [[prefix | None, [route]]],
    "tls": null | {"mode", "credential"}, "https_redirect"}`: the routes the gateway
    tries on each of its path prefixes, or on the rest of its hosts, for `assemble`
    to order among the host's other claimants).
    `check` refuses an ingress on a service with no HTTP port, and a host
    listed twice. Sidecar domains include the short names;
    `assemble` drops those another service shares. Plain data: the target's
    `lower_service` makes pieces of the virtual hosts.
    """
    hashing = service.load_balancer.consistent_hash if service.load_balancer else None
    by_port = len(service.http_ports) > 1  # the VirtualService then names its routes per port
    http = [{"port": port.number,
             "virtual_host": _virtual_host(f"{service.fqdn}:{port.number}",
                                           _service_domains(service, port.number),
                                           _routes(service, port.number, hashing, f"-{port.number}" if by_port else ""))}
            for port in service.http_ports]
    ingress = service.ingress
    if ingress is None:
        return http, None
    assert http, f"{service.key}: an ingress without an HTTP port passed check"
    first = service.http_ports[0].number  # ingress traffic goes to the first HTTP port
    blocks = [[prefix, _routes(replace(service, routes=gateway.routes_under(service, prefix)), first, hashing, "")]
              for prefix in ingress.paths or (None,)]
    tls = {"mode": ingress.tls.mode, "credential": ingress.tls.credential_name} if ingress.tls else None
    return http, {"port": ingress.port, "hosts": list(ingress.hosts), "paths": list(ingress.paths), "blocks": blocks,
                  "tls": tls, "https_redirect": ingress.https_redirect}


def assemble(fragments: list[dict]) -> tuple[list[dict], list[Diagnostic]]:
    """Every route configuration (unsorted) from the services' fragments, and what the
    target could not express between them (a short name two services share)."""
    sidecar, problems = _sidecar_configs(fragments)
    return sidecar + _gateway_configs(fragments), problems


# --- sidecar: one route configuration per HTTP port -------------------------

def _sidecar_configs(fragments: list[dict]) -> tuple[list[dict], list[Diagnostic]]:
    by_port: dict[int, list[tuple[dict, dict]]] = defaultdict(list)
    for fragment in fragments:
        for entry in fragment["http"]:
            by_port[entry["port"]].append((fragment, entry))
    configs, problems = [], []
    for port in sorted(by_port):
        hosts, found = _sidecar_hosts(by_port[port], port)
        configs.append(_config(str(port), hosts))
        problems += found
    return configs, problems


def _sidecar_hosts(entries: list[tuple[dict, dict]], port: int) -> tuple[list[tuple[str, Piece]], list[Diagnostic]]:
    """Virtual hosts `FQDN:PORT`, by name; a short name two namespaces share is left out of both."""
    counts = Counter(d for _, entry in entries for d in entry["domains"])
    if all(c == 1 for c in counts.values()):
        return [(entry["name"], entry["virtual_host"]) for _, entry in entries], []
    hosts, problems = [], []
    for fragment, entry in entries:
        domains = entry["domains"]  # sorted, so every filtered list below is too
        for name in (d for d in domains if counts[d] > 1 and ":" not in d):
            problems.append(Diagnostic(
                "envoy.ambiguous-short-name",
                f"{fragment['service']}: host name {name!r} on port {port} also names another "
                f"service; route configuration '{port}' leaves it out (use the namespaced name)",
                span(fragment["spans"]["ports"].get(str(port)) or fragment["spans"]["service"]), Severity.WARNING))
        unique = [d for d in domains if counts[d] == 1]
        host = entry["virtual_host"]
        if len(unique) != len(domains):
            host = Piece.json({**host.value, "domains": unique}, host.depth)
        hosts.append((entry["name"], host))
    return hosts, problems


def _service_domains(service: Service, port: int) -> list[str]:
    if service.external is not None:  # outside the mesh it has its own host and no short names
        return [service.fqdn, f"{service.fqdn}:{port}"]
    names = [service.fqdn, service.name, f"{service.name}.{service.namespace}",
             f"{service.name}.{service.namespace}.svc"]
    return names + [f"{name}:{port}" for name in names]


# --- gateway: one route configuration per ingress port -----------------------

def _gateway_configs(fragments: list[dict]) -> list[dict]:
    """A virtual host per ingress host: each claimant's blocks in the order `gateway.plan` gives."""
    ingresses = {f["service"]: f["ingress"] for f in fragments if f["ingress"] is not None}
    blocks = {(key, prefix): routes for key, ing in ingresses.items() for prefix, routes in ing["blocks"]}
    by_port: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for h in gateway.plan([gateway.Claim(key, tuple(ing["hosts"]), ing["port"], tuple(ing["paths"])) for key, ing in ingresses.items()]):
        routes = [route for key, prefix in h.blocks for route in blocks[(key, prefix)]]
        by_port[h.port].append((_gateway_host_name(h.host, h.port), _gateway_host(h.host, h.port, routes)))
        if ingresses[h.owner]["https_redirect"]:  # Istio's `tls.httpsRedirect` server: 301 to https, on port 80
            redirect = [{"name": "https-redirect", "match": {"prefix": "/"}, "redirect": {"https_redirect": True}}]
            by_port[REDIRECT_PORT].append((_gateway_host_name(h.host, REDIRECT_PORT), _gateway_host(h.host, REDIRECT_PORT, redirect)))
    # A port that is also a service port gets no gateway listener (`listeners.assemble` says
    # why): no route configuration either, which nothing would name.
    service_ports = {e["port"] for f in fragments for e in f["http"] + f["tcp"]}
    return [_config(gateway_route_name(port), by_port[port]) for port in sorted(by_port) if port not in service_ports]


def _gateway_host(host: str, port: int, routes: list[dict]) -> dict:
    domains = [host] if host == "*" else [host, f"{host}:{port}"]
    return _virtual_host(_gateway_host_name(host, port), domains, routes)


def _gateway_host_name(host: str, port: int) -> str:
    return f"{host}:{port}"


# --- shared -----------------------------------------------------------------

def _config(name: str, hosts: list[tuple[str, Piece]]) -> dict:
    """A route configuration of (name, virtual host) pairs, sorted by name."""
    return {"@type": ROUTES, "name": name, "virtual_hosts": [vh for _, vh in sorted(hosts, key=itemgetter(0))]}


def _virtual_host(name: str, domains: list[str], routes: list[dict]) -> dict:
    return {"name": name, "domains": sorted(domains), "routes": routes}


def _routes(service: Service, port: int, hashing: ConsistentHash | None, suffix: str) -> list[dict]:
    """The service's routes (`service.routes`, in order), named as the VirtualService's `http[]`
    entries are (istiod names each Envoy route after its entry)."""
    return [_route(service, r, port, hashing, suffix) for r in service.routes]


def _route(service: Service, r: Route, port: int, hashing: ConsistentHash | None, suffix: str) -> dict:
    out: dict = {"name": r.name + suffix, "match": _match(r.match)}
    if r.redirect:
        out["redirect"] = _redirect(r.redirect)
    elif r.direct_response:
        d = r.direct_response
        out["direct_response"] = {"status": d.status, **({"body": {"inline_string": d.body}} if d.body is not None else {})}
    else:
        out["route"] = _action(default_destinations(service, port, r.traffic), _action_policy(r, hashing, port))
    out.update(_header_ops(r.headers))
    per_filter = {}
    if r.fault and not (r.redirect or r.direct_response):
        per_filter["envoy.filters.http.fault"] = _fault(r.fault)
    if r.cors:
        per_filter["envoy.filters.http.cors"] = _cors(r.cors)
    if per_filter:
        out["typed_per_filter_config"] = per_filter
    return out


def _match(match: RouteMatch) -> dict:
    """istiod's TranslateRouteMatch: the path (`prefix: /` when none), headers sorted by name,
    then the method as `:method`, then query parameters."""
    path = match.path
    if path is None:
        out: dict = {"prefix": "/"}
    elif path.kind is MatchKind.REGEX:
        out = {"safe_regex": {"regex": path.value}}
    else:
        out = {"path" if path.kind is MatchKind.EXACT else "prefix": path.value}
    headers = _headers(match.headers)
    if match.methods:
        method = {"exact": match.methods[0]} if len(match.methods) == 1 else {"safe_regex": {"regex": "|".join(match.methods)}}
        headers.append({"name": ":method", "string_match": method})
    if headers:
        out["headers"] = headers
    if match.query:
        out["query_parameters"] = [{"name": q.name, "string_match": _string_match(q)} for q in match.query]
    return out


def _headers(matches: tuple[HeaderMatch, ...]) -> list[dict]:
    return [{"name": m.header, "present_match": True} if m.kind is MatchKind.PRESENT
            else {"name": m.header, "string_match": _string_match(m)} for m in matches]


def _string_match(match) -> dict:
    if match.kind is MatchKind.REGEX:
        return {"safe_regex": {"regex": match.value}}
    return {match.kind.value: match.value}  # "exact" | "prefix"


_REDIRECT_CODES = {301: "MOVED_PERMANENTLY", 302: "FOUND", 303: "SEE_OTHER", 307: "TEMPORARY_REDIRECT",
                   308: "PERMANENT_REDIRECT"}


def _redirect(r: Redirect) -> dict:
    """istiod's ApplyRedirect; a port that is the scheme's default is left out, as istiod does."""
    out: dict = {}
    if r.scheme:
        out["scheme_redirect"] = r.scheme
    if r.host:
        out["host_redirect"] = r.host
    if r.port is not None and (r.scheme, r.port) not in (("http", 80), ("https", 443)):
        out["port_redirect"] = r.port
    if r.path is not None:
        out["path_redirect"] = r.path
    out["response_code"] = _REDIRECT_CODES[r.code]
    return out


def _million(percent: float) -> dict:
    """A percentage as istiod's translatePercentToFractionalPercent: parts per million, truncated."""
    return {"numerator": int(percent * 10000), "denominator": "MILLION"}


def _fault(f: Fault) -> dict:
    out: dict = {"@type": FAULT}
    if f.delay_ms is not None:
        out["delay"] = {"fixed_delay": duration(f.delay_ms), "percentage": _million(f.delay_percent)}
    if f.abort_status is not None:
        out["abort"] = {"http_status": f.abort_status, "percentage": _million(f.abort_percent)}
    elif f.abort_grpc_status is not None:
        out["abort"] = {"grpc_status": GRPC_STATUSES.index(f.abort_grpc_status), "percentage": _million(f.abort_percent)}
    return out


def _cors(c: Cors) -> dict:
    """istiod's TranslateCORSPolicy: lists joined by ",", max_age in whole seconds."""
    out: dict = {"@type": CORS_POLICY, "allow_origin_string_match": [_string_match(o) for o in c.allow_origins]}
    for key, values in (("allow_methods", c.allow_methods), ("allow_headers", c.allow_headers),
                        ("expose_headers", c.expose_headers)):
        if values:
            out[key] = ",".join(values)
    if c.max_age_ms is not None:
        out["max_age"] = str(c.max_age_ms // 1000)
    if c.allow_credentials is not None:
        out["allow_credentials"] = c.allow_credentials
    out["filter_enabled"] = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    out["forward_not_matching_preflights"] = True
    return out


def _header_ops(h: Headers | None) -> dict:
    """Route header manipulation: `set` overwrites, `add` appends (istiod's TranslateHeadersOperations)."""
    if h is None:
        return {}
    out: dict = {}
    for side, ops in (("request", h.request), ("response", h.response)):
        added = [{"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"} for k, v in ops.set]
        added += [{"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"} for k, v in ops.add]
        if added:
            out[f"{side}_headers_to_add"] = added
        if ops.remove:
            out[f"{side}_headers_to_remove"] = list(ops.remove)
    return out


def _action_policy(r: Route, hashing: ConsistentHash | None, port: int) -> dict:
    """What a route action carries besides its clusters: timeout, retries, hashing, rewrite, mirror."""
    policy: dict = {"timeout": duration(r.timeout_ms or 0)}
    retry = _retry_policy(r.retries, hashing is not None)
    if retry:
        policy["retry_policy"] = retry
    if hashing:
        policy["hash_policy"] = [_hash_policy(hashing)]
    rewrite = r.rewrite
    if rewrite is not None:
        if rewrite.prefix is not None:
            policy["prefix_rewrite"] = rewrite.prefix
        if rewrite.regex is not None:
            policy["regex_rewrite"] = {"pattern": {"regex": rewrite.regex}, "substitution": rewrite.substitute}
        if rewrite.authority is not None:
            policy["host_rewrite_literal"] = rewrite.authority
    if r.mirror and r.mirror.percent > 0:
        policy["request_mirror_policies"] = [{
            "cluster": cluster_name(port, r.mirror.fqdn, r.mirror.version or ""),
            "runtime_fraction": {"default_value": _million(r.mirror.percent)},
            "trace_sampled": False}]
    return policy


def mirrored_elsewhere(service: Service) -> list[str]:
    """The clusters of other services that this service's routes mirror to: they come with
    the other service's fragment (`check.claims` has made sure it has them)."""
    return sorted({cluster_name(p.number, r.mirror.fqdn, r.mirror.version or "")
                   for r in service.routes if r.mirror and r.mirror.percent > 0 and r.mirror.service != service.key
                   for p in service.ports if p.is_http})


def _action(destinations: tuple[tuple[str, int], ...], policy: dict) -> dict:
    if len(destinations) == 1:
        return {"cluster": destinations[0][0], **policy}
    return {"weighted_clusters": {"clusters": [{"name": n, "weight": w} for n, w in destinations]}, **policy}


def _retry_policy(retries: Retries | None, consistent_hash: bool) -> dict | None:
    """istiod's ConvertPolicy: its default without `retries`, none for `attempts: 0`.

    Numeric `retryOn` entries become `retriable_status_codes`. Retries avoid
    the hosts already tried, except under consistent hashing.
    """
    if retries is not None and retries.attempts <= 0:
        return None
    policy: dict = {"retry_on": DEFAULT_RETRY_ON, "num_retries": DEFAULT_NUM_RETRIES,
                    "host_selection_retry_max_attempts": "5"}
    if DEFAULT_RETRIABLE_STATUS_CODES:
        policy["retriable_status_codes"] = list(DEFAULT_RETRIABLE_STATUS_CODES)
    if not consistent_hash:
        policy["retry_host_predicate"] = [{"name": "envoy.retry_host_predicates.previous_hosts",
                                           "typed_config": {"@type": PREVIOUS_HOSTS}}]
    if retries is None:
        return policy
    policy["num_retries"] = retries.attempts
    if retries.retry_on:
        codes = [int(c) for c in retries.retry_on if c.isdigit()]
        conditions = [c for c in retries.retry_on if not c.isdigit()]
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        policy["retry_on"] = ",".join(conditions)
        policy["retriable_status_codes"] = codes
    if retries.per_try_timeout_ms is not None:
        policy["per_try_timeout"] = duration(retries.per_try_timeout_ms)
    if not policy.get("retriable_status_codes"):
        policy.pop("retriable_status_codes", None)
    return policy


def _hash_policy(hashing: ConsistentHash) -> dict:
    if hashing.on is HashOn.HEADER:
        return {"header": {"header_name": hashing.header}}
    if hashing.on is HashOn.COOKIE:
        cookie: dict = {"name": hashing.cookie}
        if hashing.cookie_ttl_ms is not None:
            cookie["ttl"] = duration(hashing.cookie_ttl_ms)
        if hashing.cookie_path:
            cookie["path"] = hashing.cookie_path
        return {"cookie": cookie}
    return {"connection_properties": {"source_ip": True}}
