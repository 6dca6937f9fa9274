"""Names, filter type URLs and small proto3-JSON builders shared by the Envoy lowering
(the resource type URLs are `compiler.xds.resources`, shared with the server).

Names follow istiod's conventions so a config dump reads like Istio's:
cluster `outbound|PORT|SUBSET|FQDN`, route configuration `PORT` (gateway:
`http.PORT`), listener `ADDRESS_PORT`.
"""

from __future__ import annotations

from compiler.diagnostics import Diagnostic, Severity, Span
from compiler.model import Service, Traffic, TrafficShape
from compiler.values import format_duration

ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
CORS = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
CORS_POLICY = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
#: An HTTP connection manager's filters, as istiod orders them: fault and CORS (configured per
#: route by `typed_per_filter_config`, doing nothing on a route without) before the router.
HTTP_FILTERS = ({"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT}},
                {"name": "envoy.filters.http.cors", "typed_config": {"@type": CORS}},
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"

#: The ConfigSource of every cross-reference: the same ADS stream, xDS v3.
ADS = {"ads": {}, "resource_api_version": "V3"}

#: How long a proxy waits for a secret before it starts without it. istiod sets 0s (forever:
#: its node agent always answers); Envoy's default is 15 s, all of it without listeners. Over
#: Delta, `meshc serve` says at once that a secret it lacks does not exist; SotW has no way to
#: say so for SDS (xds_protocol: only a timeout tells), so this bounds the wait there. A secret
#: that comes later is still applied when it arrives.
SECRET_FETCH_TIMEOUT = "1s"


def sds_secret(name: str) -> dict:
    """An SDS secret on the ADS stream, by istiod's name (`default`, `ROOTCA`, `kubernetes://NAME`)."""
    return {"name": name, "sds_config": {**ADS, "initial_fetch_timeout": SECRET_FETCH_TIMEOUT}}


def cluster_name(port: int, fqdn: str, version: str = "") -> str:
    """`outbound|9080|v2|reviews.bookinfo.svc.cluster.local`; no version: the whole service."""
    return f"outbound|{port}|{version}|{fqdn}"


def listener_name(address: str, port: int) -> str:
    return f"{address}_{port}"


#: Where an ingress with `httpsRedirect` answers plain HTTP with a redirect to https.
REDIRECT_PORT = 80


def gateway_route_name(port: int) -> str:
    return f"http.{port}"


duration = format_duration  # whole milliseconds as a protobuf JSON Duration: 250 → "0.250s"


def span_of(service: Service, *path: str | int) -> list | None:
    """Where a policy field was set, as JSON (`[path, line, col]`), or None without spans.

    Spans are keyed relative to the effective spec. Fragments hold spans in
    this form so they survive a JSON round trip through the pipeline's cache.
    """
    span = service.spans.at(path)
    return None if span is None else [span.path, span.line, span.col]


def problem(code: str, message: str, span: list | None, severity: Severity = Severity.ERROR) -> dict:
    """A diagnostic as plain JSON data, for a fragment; `diagnostic` turns it back."""
    return {"code": code, "message": message, "severity": severity.value, "span": span}


def diagnostic(value: dict) -> Diagnostic:
    """A `problem` dict (possibly JSON round-tripped) back as a Diagnostic."""
    return Diagnostic(value["code"], value["message"], span(value["span"]), Severity(value["severity"]))


def span(value: list | None) -> Span | None:
    """A `span_of` value back as a Span."""
    return None if value is None else Span(*value)


def default_destinations(service: Service, port: int, traffic: Traffic | None = None) -> tuple[tuple[str, int], ...]:
    """Where `traffic` (default: the service's own) sends a request: (cluster, weight) pairs.

    NONE: the whole service; STABLE: the stable version; CANARY and SPLIT:
    every version with a non-zero weight, in the model's order (stable then
    canary; version names). Zero weights are dropped, as istiod drops them.
    """
    traffic = traffic or service.traffic
    if traffic.shape is TrafficShape.NONE:
        return ((cluster_name(port, service.fqdn), 100),)
    if traffic.shape is TrafficShape.STABLE:
        return ((cluster_name(port, service.fqdn, traffic.stable), 100),)
    return tuple((cluster_name(port, service.fqdn, w.version), w.weight)
                 for w in traffic.weights if w.weight > 0)
