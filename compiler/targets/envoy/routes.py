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

from compiler.diagnostics import Diagnostic, Severity
from compiler.model import ConsistentHash, HashOn, HeaderMatch, MatchKind, Mesh, Retries, Service
from compiler.targets.envoy.common import (PREVIOUS_HOSTS, ROUTES, cluster_name, default_destinations,
                                           duration, gateway_route_name, span_of)

#: istiod's retry policy for a route whose VirtualService sets no `retries`
#: (pilot/pkg/networking/core/route/retry/retry.go).
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIABLE_STATUS_CODES = (503,)
DEFAULT_NUM_RETRIES = 2


def lower(mesh: Mesh) -> tuple[list[dict], list[Diagnostic]]:
    """Every route configuration (unsorted) and what could not be expressed."""
    sidecar, problems = _sidecar_configs(mesh)
    gateway, more = _gateway_configs(mesh)
    return sidecar + gateway, problems + more


def ingress_port(service: Service) -> int | None:
    """The service port ingress traffic goes to: its first HTTP port."""
    return service.http_ports[0].number if service.http_ports else None


# --- sidecar: one route configuration per HTTP port -------------------------

def _sidecar_configs(mesh: Mesh) -> tuple[list[dict], list[Diagnostic]]:
    by_port: dict[int, list[Service]] = defaultdict(list)
    for service in mesh.services:
        for port in service.http_ports:
            by_port[port.number].append(service)
    configs, problems = [], []
    for port in sorted(by_port):
        hosts, found = _sidecar_hosts(by_port[port], port)
        configs.append(_config(str(port), hosts))
        problems += found
    return configs, problems


def _sidecar_hosts(services: list[Service], port: int) -> tuple[list[dict], list[Diagnostic]]:
    """Virtual hosts `FQDN:PORT`; a short name two namespaces share is left out of both."""
    domains = {s.key: _service_domains(s, port) for s in services}
    counts = Counter(d for names in domains.values() for d in names)
    hosts, problems = [], []
    for service in services:
        shared = sorted(d for d in domains[service.key] if counts[d] > 1 and ":" not in d)
        for name in shared:
            problems.append(Diagnostic(
                "envoy.ambiguous-short-name",
                f"{service.key}: host name {name!r} on port {port} also names another "
                f"service; route configuration '{port}' leaves it out (use the namespaced name)",
                span_of(service), Severity.WARNING))
        unique = [d for d in domains[service.key] if counts[d] == 1]
        hosts.append(_virtual_host(f"{service.fqdn}:{port}", unique, service, port))
    return hosts, problems


def _service_domains(service: Service, port: int) -> list[str]:
    names = [service.fqdn, service.name, f"{service.name}.{service.namespace}",
             f"{service.name}.{service.namespace}.svc"]
    return names + [f"{name}:{port}" for name in names]


# --- gateway: one route configuration per ingress port -----------------------

def _gateway_configs(mesh: Mesh) -> tuple[list[dict], list[Diagnostic]]:
    by_port: dict[int, dict[str, Service]] = defaultdict(dict)
    problems = []
    for service in mesh.services:
        if service.ingress is None:
            continue
        if ingress_port(service) is None:
            problems.append(Diagnostic(
                "envoy.ingress-without-http-port",
                f"{service.key}: ingress needs an HTTP port to route to; the service has none",
                span_of(service, "ingress"), Severity.ERROR))
            continue
        hosts = by_port[service.ingress.port]
        for host in service.ingress.hosts:
            if host in hosts:
                problems.append(Diagnostic(
                    "envoy.ingress-host-conflict",
                    f"{service.key}: ingress host {host!r} on port {service.ingress.port} "
                    f"is already routed to {hosts[host].key}",
                    span_of(service, "ingress", "hosts"), Severity.ERROR))
                continue
            hosts[host] = service
    configs = [_config(gateway_route_name(port), [_gateway_host(host, service, port)
                                                  for host, service in by_port[port].items()])
               for port in sorted(by_port)]
    return configs, problems


def _gateway_host(host: str, service: Service, port: int) -> dict:
    domains = [host] if host == "*" else [host, f"{host}:{port}"]
    return _virtual_host(f"{host}:{port}", domains, service, ingress_port(service))


# --- shared -----------------------------------------------------------------

def _config(name: str, hosts: list[dict]) -> dict:
    return {"@type": ROUTES, "name": name, "virtual_hosts": sorted(hosts, key=lambda h: h["name"])}


def _virtual_host(name: str, domains: list[str], service: Service, port: int) -> dict:
    return {"name": name, "domains": sorted(domains), "routes": _routes(service, port)}


def _routes(service: Service, port: int) -> list[dict]:
    """The header-match route (if any), then the default route."""
    traffic = service.traffic
    routes = []
    if traffic.match and traffic.match_version:
        target = ((cluster_name(port, service.fqdn, traffic.match_version), 100),)
        routes.append({"name": "match", "match": {"prefix": "/", "headers": _headers(traffic.match)},
                       "route": _action(service, target)})
    routes.append({"name": "default", "match": {"prefix": "/"},
                   "route": _action(service, default_destinations(service, port))})
    return routes


def _headers(matches: tuple[HeaderMatch, ...]) -> list[dict]:
    return [{"name": m.header, "string_match": _string_match(m)} for m in matches]


def _string_match(match: HeaderMatch) -> dict:
    if match.kind is MatchKind.REGEX:
        return {"safe_regex": {"regex": match.value}}
    return {match.kind.value: match.value}  # "exact" | "prefix"


def _action(service: Service, destinations: tuple[tuple[str, int], ...]) -> dict:
    if len(destinations) == 1:
        action: dict = {"cluster": destinations[0][0]}
    else:
        action = {"weighted_clusters": {"clusters": [{"name": n, "weight": w} for n, w in destinations]}}
    action["timeout"] = duration(service.timeout_ms or 0)
    hashing = service.load_balancer.consistent_hash if service.load_balancer else None
    retry = _retry_policy(service.retries, hashing is not None)
    if retry:
        action["retry_policy"] = retry
    if hashing:
        action["hash_policy"] = [_hash_policy(hashing)]
    return action


def _retry_policy(retries: Retries | None, consistent_hash: bool) -> dict | None:
    """istiod's ConvertPolicy: its default without `retries`, none for `attempts: 0`.

    Numeric `retryOn` entries become `retriable_status_codes`. Retries avoid
    the hosts already tried, except under consistent hashing.
    """
    if retries is not None and retries.attempts <= 0:
        return None
    policy: dict = {"retry_on": DEFAULT_RETRY_ON, "num_retries": DEFAULT_NUM_RETRIES,
                    "retriable_status_codes": list(DEFAULT_RETRIABLE_STATUS_CODES),
                    "host_selection_retry_max_attempts": "5"}
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
    if not policy["retriable_status_codes"]:
        del policy["retriable_status_codes"]
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
