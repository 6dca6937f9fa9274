"""Listeners: `ADDRESS_PORT` per HTTP port, TCP port and ingress port.

HTTP ports get an HTTP connection manager that fetches route configuration
`PORT` over RDS; ingress ports get a gateway HTTP connection manager on
`http.PORT`, behind a TLS filter chain per certificate where the ingress
terminates TLS (chosen by SNI, as istiod's gateway does), and port 80 answers
with a redirect to https for an ingress with `httpsRedirect`; a TCP port gets
a TCP proxy to its service's clusters. All bind the environment's
`envoy.listenerAddress`.
https://www.envoyproxy.io/docs/envoy/latest/api-v3/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto
"""

from __future__ import annotations

from collections import defaultdict

from compiler.diagnostics import Diagnostic, Severity
from compiler.model import HashOn, Service
from compiler.targets.envoy.common import (ADS, DOWNSTREAM_TLS, HTTP_FILTERS, REDIRECT_PORT, TLS_INSPECTOR,
                                          default_destinations, gateway_route_name, listener_name, sds_secret, span)
from compiler.xds.resources import HCM, LISTENER, TCP_PROXY


def lower(service: Service) -> list[dict]:
    """What one service asks of the listeners: `[{"port", "tcp_proxy"}]` for its TCP ports, in port order.

    The HTTP and ingress ports the listeners need are in the routes' part of
    the fragment; whether a TCP port gets its proxy depends on the other services.
    """
    return [{"port": port.number, "tcp_proxy": _tcp_proxy(service, port.number)}
            for port in service.ports if not port.is_http]


def assemble(address: str, fragments: list[dict]) -> tuple[list[dict], list[Diagnostic]]:
    """Every listener (unsorted), and what the target cannot express: an ingress port that
    is also a service port (one listener per port and address)."""
    http, tcp, ingress = _ports(fragments)
    listeners = [_http_listener(address, port, str(port), gateway=False) for port in sorted(http)]
    listeners += [_tcp_listener(address, port, tcp[port], http.get(port, [])) for port in sorted(tcp)]
    problems = []
    for port in sorted(ingress):
        if port in http or port in tcp:
            problems += [_ingress_conflict(f, port) for f in ingress[port]]
        else:
            listeners.append(_gateway_listener(address, port, ingress[port]))
    return listeners, problems


def _ports(fragments: list[dict]) -> tuple[dict, dict, dict]:
    """By port, in mesh order: HTTP → service names; TCP → (fragment, tcp_proxy); ingress → fragments."""
    http, tcp, ingress = defaultdict(list), defaultdict(list), defaultdict(list)
    for fragment in fragments:
        for entry in fragment["http"]:
            http[entry["port"]].append(fragment["service"])
        for entry in fragment["tcp"]:
            tcp[entry["port"]].append((fragment, entry["tcp_proxy"]))
        gateway = fragment["ingress"]
        if gateway is not None:
            ingress[gateway["port"]].append(fragment)
            if gateway["https_redirect"]:
                ingress[REDIRECT_PORT].append({**fragment, "ingress": {**gateway, "port": REDIRECT_PORT, "tls": None}})
    return http, tcp, ingress


def _gateway_listener(address: str, port: int, fragments: list[dict]) -> dict:
    """The gateway's listener on `port`: plain, or one TLS filter chain per certificate, each
    taking its hosts by SNI (`check.claims` makes a port TLS for all its hosts or for none)."""
    listener = _http_listener(address, port, gateway_route_name(port), gateway=True)
    by_tls: dict[tuple[str, str], list[str]] = {}
    for fragment in fragments:
        tls = fragment["ingress"]["tls"]
        if tls is not None:
            hosts = by_tls.setdefault((tls["mode"], tls["credential"]), [])
            hosts += [h for h in fragment["ingress"]["hosts"] if h not in hosts]
    if not by_tls:
        return listener
    [plain] = listener["filter_chains"]
    chains = []
    for (mode, credential), hosts in sorted(by_tls.items()):
        names = sorted(h for h in hosts if h != "*")  # `*` takes every name: no server_names at all
        match = {"filter_chain_match": {"server_names": names}} if names and "*" not in hosts else {}
        chains.append({**match, **plain, "transport_socket": _downstream_tls(mode, credential)})
    return {**listener, "filter_chains": chains, "listener_filters": [
        {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_INSPECTOR}}]}


def _downstream_tls(mode: str, credential: str) -> dict:
    """istiod's gateway TLS: the certificate `kubernetes://NAME` by SDS; MUTUAL also asks for the
    client's and verifies it against `kubernetes://NAME-cacert`."""
    common: dict = {"alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificate_sds_secret_configs": [sds_secret(f"kubernetes://{credential}")]}
    context: dict = {"@type": DOWNSTREAM_TLS, "common_tls_context": common}
    if mode == "MUTUAL":
        common["combined_validation_context"] = {
            "default_validation_context": {},
            "validation_context_sds_secret_config": sds_secret(f"kubernetes://{credential}-cacert")}
        context["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _http_listener(address: str, port: int, route_config: str, *, gateway: bool) -> dict:
    name = listener_name(address, port)
    manager = {
        "@type": HCM,
        "stat_prefix": f"outbound_{name}",
        "rds": {"config_source": ADS, "route_config_name": route_config},
        "http_filters": list(HTTP_FILTERS),
    }
    if gateway:
        manager["use_remote_address"] = True  # the gateway is the edge: trust no X-Forwarded-For
    return _listener(name, address, port, "envoy.filters.network.http_connection_manager", manager)


def _tcp_listener(address: str, port: int, claims: list[tuple[dict, dict]], http_services: list[str]) -> dict:
    """A TCP proxy to the one service on this port. Without a service IP to tell them apart,
    a port that several services (or an HTTP listener) claim cannot be proxied: `check.claims`
    refuses it before lowering."""
    assert len(claims) == 1 and not http_services, f"TCP port {port} shared by several services passed check"
    proxy = claims[0][1]
    return _listener(listener_name(address, port), address, port, "envoy.filters.network.tcp_proxy", proxy)


def _tcp_proxy(service: Service, port: int) -> dict:
    """The tcp_proxy config to the service's clusters on `port` (weighted as its default route)."""
    destinations = default_destinations(service, port)
    proxy: dict = {"@type": TCP_PROXY, "stat_prefix": destinations[0][0]}
    if len(destinations) == 1:
        proxy["cluster"] = destinations[0][0]
    else:
        proxy["weighted_clusters"] = {"clusters": [{"name": n, "weight": w} for n, w in destinations]}
    hashing = service.load_balancer.consistent_hash if service.load_balancer else None
    if hashing is not None and hashing.on is HashOn.SOURCE_IP:
        # RING_HASH without a hash key picks a random host per connection.
        proxy["hash_policy"] = [{"source_ip": {}}]
    return proxy


def _listener(name: str, address: str, port: int, filter_name: str, config: dict) -> dict:
    return {
        "@type": LISTENER,
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [{"name": filter_name, "typed_config": config}]}],
        "traffic_direction": "OUTBOUND",
    }


def _ingress_conflict(fragment: dict, port: int) -> Diagnostic:
    return Diagnostic(
        "envoy.ingress-port-conflict",
        f"{fragment['service']}: ingress port {port} is also a service port in this environment; "
        "the Envoy target binds one listener per port on the same address, so it cannot "
        "serve both the gateway and the services there: it leaves the gateway listener out",
        span(fragment["spans"]["ingress_port"]), Severity.WARNING)
