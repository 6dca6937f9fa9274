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
from operator import itemgetter

from compiler.diagnostics import Diagnostic, Severity
from compiler.emit import Piece
from compiler.model import ConsistentHash, HashOn, HeaderMatch, MatchKind, Retries, Service
from compiler.targets.envoy.common import (PREVIOUS_HOSTS, cluster_name, default_destinations, duration,
                                           gateway_route_name, span)
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
    ingress, else `{"port", "virtual_hosts": [[host, virtual host], ...]}` in
    the ingress's host order). `check` refuses an ingress on a service with no
    HTTP port, and a host listed twice. Sidecar domains include the short names;
    `assemble` drops those another service shares. Plain data: the target's
    `lower_service` makes pieces of the virtual hosts.
    """
    action = _action_policy(service)
    by_port = len(service.http_ports) > 1  # the VirtualService then names its routes per port
    http = [{"port": port.number,
             "virtual_host": _virtual_host(f"{service.fqdn}:{port.number}",
                                           _service_domains(service, port.number),
                                           _routes(service, port.number, action, f"-{port.number}" if by_port else ""))}
            for port in service.http_ports]
    ingress = service.ingress
    if ingress is None:
        return http, None
    assert http, f"{service.key}: an ingress without an HTTP port passed check"
    routes = http[0]["virtual_host"]["routes"]  # ingress traffic goes to the first HTTP port
    return http, {"port": ingress.port,
                  "virtual_hosts": [[host, _gateway_host(host, ingress.port, routes)] for host in ingress.hosts]}


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
                span(fragment["spans"]["service"]), Severity.WARNING))
        unique = [d for d in domains if counts[d] == 1]
        host = entry["virtual_host"]
        if len(unique) != len(domains):
            host = Piece.json({**host.value, "domains": unique}, host.depth)
        hosts.append((entry["name"], host))
    return hosts, problems


def _service_domains(service: Service, port: int) -> list[str]:
    names = [service.fqdn, service.name, f"{service.name}.{service.namespace}",
             f"{service.name}.{service.namespace}.svc"]
    return names + [f"{name}:{port}" for name in names]


# --- gateway: one route configuration per ingress port -----------------------

def _gateway_configs(fragments: list[dict]) -> list[dict]:
    """`check.claims` refuses a host claimed twice in an environment, so each host here is one service's."""
    by_port: dict[int, dict[str, Piece]] = defaultdict(dict)  # port → host → virtual host
    for fragment in fragments:
        ingress = fragment["ingress"]
        if ingress is None:
            continue
        hosts = by_port[ingress["port"]]
        for host, virtual_host in ingress["virtual_hosts"]:
            assert host not in hosts, f"ingress host {host!r} claimed twice passed check"
            hosts[host] = virtual_host
    return [_config(gateway_route_name(port), [(_gateway_host_name(host, port), vh) for host, vh in by_port[port].items()])
            for port in sorted(by_port)]


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


def _routes(service: Service, port: int, policy: dict, suffix: str) -> list[dict]:
    """The header-match route (if any), then the default route, named as the VirtualService's
    `http[]` entries are (istiod names each Envoy route after its entry)."""
    traffic = service.traffic
    routes = []
    if traffic.match and traffic.match_version:
        target = ((cluster_name(port, service.fqdn, traffic.match_version), 100),)
        routes.append({"name": f"canary-match{suffix}", "match": {"prefix": "/", "headers": _headers(traffic.match)},
                       "route": _action(target, policy)})
    routes.append({"name": f"default{suffix}", "match": {"prefix": "/"},
                   "route": _action(default_destinations(service, port), policy)})
    return routes


def _headers(matches: tuple[HeaderMatch, ...]) -> list[dict]:
    return [{"name": m.header, "string_match": _string_match(m)} for m in matches]


def _string_match(match: HeaderMatch) -> dict:
    if match.kind is MatchKind.REGEX:
        return {"safe_regex": {"regex": match.value}}
    return {match.kind.value: match.value}  # "exact" | "prefix"


def _action_policy(service: Service) -> dict:
    """What every route action of a service carries besides its clusters: timeout, retries, hashing.

    Built once per service and shared by its routes.
    """
    hashing = service.load_balancer.consistent_hash if service.load_balancer else None
    policy: dict = {"timeout": duration(service.timeout_ms or 0)}
    retry = _retry_policy(service.retries, hashing is not None)
    if retry:
        policy["retry_policy"] = retry
    if hashing:
        policy["hash_policy"] = [_hash_policy(hashing)]
    return policy


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
