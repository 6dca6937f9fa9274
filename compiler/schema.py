"""Schemas for TrafficPolicy and Environment documents, and their validation.

The schemas are cerberus schemas, and cerberus is the authority for every
message a user sees. Cerberus costs ~2.6 ms per policy, though, which alone
would blow the compile budget for a thousand services; so a valid document
is first tried by `_fast_ok`, a small interpreter of the very same schema
dicts (the subset of rules used here) at ~50× the speed. Only a document the
fast path rejects goes through cerberus for its errors. Both read the same
dicts and share the `check_with` functions, and a test holds them to the
same verdict on the whole bad-input corpus.

Error paths are mapped back to spans through the document's `SpanMap`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable

from compiler.diagnostics import Diagnostics, SpanMap, did_you_mean
from compiler.values import is_ip, parse_duration

API_VERSION = "meshc.dev/v1"

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS1035_LABEL = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"  # what Kubernetes requires of a Service name
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
LABEL_KEY = r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?"
HEADER_NAME = r"[a-z0-9!#$%&'*+.^_`|~-]+"
HOSTNAME = rf"(\*\.)?{DNS1123_SUBDOMAIN}"
SERVICE_KEY = rf"{DNS1123_LABEL}/{DNS1123_LABEL}"

# Envoy's retry_on conditions (x-envoy-retry-on and x-envoy-retry-grpc-on), as Istio passes them through.
RETRY_ON = (
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
    "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
    "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal",
    "resource-exhausted", "unavailable",
)  # fmt: skip
SIMPLE_LB = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH")
WARMUP_LB = ("ROUND_ROBIN", "LEAST_REQUEST")  # the balancers Envoy's slow start works with
H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "TCP", "TLS")
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)  # the codes Envoy's RedirectAction can answer
GRPC_STATUSES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                 "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")  # by code, 0..16
PATCH_OPS = ("add", "remove", "replace", "move", "copy", "test")
PATCH_KINDS = ("Service", "DestinationRule", "VirtualService", "Gateway",  # the Istio output's
               "Cluster", "ClusterLoadAssignment", "Listener", "RouteConfiguration")  # the Envoy snapshot's


# -- check_with functions: value → error message or None --------------------------------


def _check_duration(value) -> str | None:
    return parse_duration(value)[1] if isinstance(value, str) else None


def _check_load_balancer(value) -> str | None:
    """The scalar form, or what the mapping form's fields must agree on (each field has its own rule).

    Nulls count as absent: an overlay's `simple: null` removes the key it names.
    """
    if isinstance(value, str):
        return None if value in SIMPLE_LB else _not_one_of(value, SIMPLE_LB)
    present = {k for k, v in value.items() if v is not None}
    if {"simple", "consistentHash"} <= present:
        return "takes `simple` or `consistentHash`, not both (an override removes one with `simple: null`)"
    # istiod applies a warmup only with these two (as Envoy's slow start); under RANDOM or a
    # consistent hash it is dropped without a word (cluster_traffic_policy.go, applyLoadBalancer).
    simple = value.get("simple")
    if "warmup" in present and ("consistentHash" in present or simple in SIMPLE_LB and simple not in WARMUP_LB):
        return f"warmup applies to {' and '.join(WARMUP_LB)} balancing only"
    return None


def _check_consistent_hash(ch) -> str | None:
    if len(ch) != 1 or next(iter(ch)) not in ("header", "cookie", "sourceIp"):
        return "takes exactly one of: header: NAME, cookie: {name, ttl}, sourceIp: true"
    kind, arg = next(iter(ch.items()))
    if kind == "header" and not (isinstance(arg, str) and re.fullmatch(HEADER_NAME, arg)):
        return "header must be a lower-case HTTP header name"
    if kind == "sourceIp" and arg is not True:
        return "sourceIp must be true"
    if kind == "cookie":
        if not isinstance(arg, dict) or not isinstance(arg.get("name"), str) or set(arg) - {"name", "ttl", "path"}:
            return "cookie takes {name: NAME, ttl: DURATION, path: PATH}"
        if "ttl" in arg:
            return _check_duration(arg["ttl"]) if isinstance(arg["ttl"], str) else "cookie ttl must be a duration"
    return None


def _check_seconds(value) -> str | None:
    if not isinstance(value, str):
        return None
    ms, problem = parse_duration(value)
    if problem:
        return problem
    # Envoy's TcpKeepalive counts seconds, and istiod drops the rest of a duration.
    return None if ms % 1000 == 0 else f"{value!r} is not a whole number of seconds (TCP keepalive counts seconds)"


def _check_endpoints(value) -> str | None:
    lists = value.values() if isinstance(value, dict) else [value]
    for addrs in lists:
        if not isinstance(addrs, list) or not addrs:
            return "expected a non-empty list of HOST:PORT addresses (or a mapping of version to such lists)"
        for a in addrs:
            problem = _address_problem(a)
            if problem:
                return problem
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or not re.fullmatch(DNS1123_LABEL, k)]
        if bad:
            return f"version name {bad[0]!r} is not a DNS-1123 label"
    return None


def _address_problem(addr) -> str | None:
    if not isinstance(addr, str) or ":" not in addr:
        return f"address {addr!r} must be HOST:PORT"
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"address {addr!r}: port must be 1..65535"
    if not (re.fullmatch(DNS1123_SUBDOMAIN, host) or is_ip(host)):
        return f"address {addr!r}: host must be an IP address or a DNS name"
    return None


def _check_ip(value) -> str | None:
    return None if isinstance(value, str) and is_ip(value) else f"{value!r} is not an IP address"


def _present(value: dict, keys: tuple[str, ...]) -> list[str]:
    """The keys of `value` that are set (an overlay's null removes a key, so it counts as absent)."""
    return [k for k in keys if value.get(k) is not None]


ROUTE_ACTIONS = ("traffic", "redirect", "directResponse")


def _check_route(value) -> str | None:
    actions = _present(value, ROUTE_ACTIONS)
    if len(actions) > 1:
        return (f"sets both `{actions[0]}` and `{actions[1]}`: a route takes one action, `traffic`, `redirect` or "
                "`directResponse` (an override that changes the action sets the other to null)")
    return None


def _check_abort(value) -> str | None:
    codes = _present(value, ("status", "grpcStatus"))
    if len(codes) != 1:
        return ("needs the status it answers with: `status` (HTTP) or `grpcStatus`" if not codes
                else "takes `status` or `grpcStatus`, not both")
    return None


def _check_redirect(value) -> str | None:
    if not _present(value, ("path", "scheme", "host", "port")):
        return "needs where it sends: `path`, `scheme`, `host` or `port` (else it sends the client back to the same URL)"
    return None


def _check_header_value(value) -> str | None:
    """An HTTP field value holds no control character but a tab (RFC 9110 §5.5): Envoy refuses
    a CR, LF or NUL in a header it writes, and no request carries one for a match to see."""
    if not isinstance(value, str):
        return None
    bad = next((c for c in value if (ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F), None)
    return None if bad is None else f"a header value cannot hold the control character U+{ord(bad):04X}"


def _check_retry_on(value) -> str | None:
    """An Envoy retry condition, or an HTTP status code (Istio's `retryOn: 5xx,503`): Envoy
    retries on those through `retriable_status_codes`."""
    if not isinstance(value, str) or value in RETRY_ON or re.fullmatch(r"[1-5][0-9][0-9]", value):
        return None
    return _not_one_of(value, RETRY_ON) + ", or an HTTP status code (100-599)"


def _check_tls(value) -> str | None:
    # Istio's validation refuses MUTUAL with neither a credentialName nor certificate files
    # ("client certificate required for mutual tls"), and a policy names no files: a proxy
    # gets the client certificate by SDS under the credential's name.
    if isinstance(value, dict) and value.get("mode") == "MUTUAL" and not value.get("credentialName"):
        return "mode MUTUAL needs `credentialName`: the Kubernetes secret with the client's certificate and key"
    return None


CHECKS: dict[str, Callable[[object], str | None]] = {
    "tls": _check_tls,
    "duration": _check_duration,
    "retry_on": _check_retry_on,
    "header_value": _check_header_value,
    "load_balancer": _check_load_balancer,
    "consistent_hash": _check_consistent_hash,
    "seconds": _check_seconds,
    "endpoints": _check_endpoints,
    "ip": _check_ip,
    "route": _check_route,
    "abort": _check_abort,
    "redirect": _check_redirect,
}


# -- schemas ------------------------------------------------------------------------------

_duration = {"type": "string", "check_with": "duration"}
_seconds = {"type": "string", "check_with": "seconds"}
_labels = {
    "type": "dict",
    "keysrules": {"type": "string", "regex": LABEL_KEY, "meta": {"what": "a label key"}},
    "valuesrules": {"type": "string", "regex": LABEL_VALUE, "meta": {"what": "a label value (63 characters: letters, digits, '-', '_', '.')"}},
}
_label = {"type": "string", "regex": DNS1123_LABEL, "meta": {"what": "a DNS-1123 label (lower-case letters, digits and '-', at most 63)"}}
_port = {"type": "integer", "min": 1, "max": 65535}
INT32_MAX = 2**31 - 1  # Istio's CRDs declare these int32
_count = {"type": "integer", "min": 0, "max": INT32_MAX}
_positive = {"type": "integer", "min": 1, "max": INT32_MAX}

_header_name = {"type": "string", "regex": HEADER_NAME, "meta": {"what": "a lower-case HTTP header name"}}
_path = {"type": "string", "regex": r"/.*", "meta": {"what": "a path starting with '/'"}}
_percent = {"type": "number", "min": 0, "max": 100}
_status = {"type": "integer", "min": 200, "max": 599}
_methods = {"type": "list", "minlength": 1, "schema": {"type": "string", "allowed": HTTP_METHODS}}


def _one_of(**rules) -> dict:
    """A mapping that sets exactly one of `rules` (a StringMatch: `{exact: ...}`)."""
    return {"type": "dict", "minlength": 1, "maxlength": 1, "schema": rules}


_string_match = _one_of(exact={"type": "string"}, prefix={"type": "string"}, regex={"type": "string"})
_header_value = {"type": "string", "check_with": "header_value"}
_header_matches = {"type": "dict", "minlength": 1, "keysrules": _header_name,
                   "valuesrules": _one_of(exact=_header_value, prefix=_header_value, regex={"type": "string"},
                                          present={"type": "boolean", "allowed": (True,)})}
_header_values = {"type": "dict", "keysrules": _header_name, "valuesrules": _header_value}
_header_ops = {"type": "dict", "schema": {"set": _header_values, "add": _header_values,
                                          "remove": {"type": "list", "schema": _header_name}}}
_HTTP_POLICY = {  # what a service sets for its HTTP routes and a route may set for itself
    "timeout": _duration,
    "retries": {
        "type": "dict",
        "schema": {
            "attempts": {"type": "integer", "required": True, "min": 0, "max": INT32_MAX},
            "perTryTimeout": _duration,
            "retryOn": {"type": "list", "schema": {"type": "string", "check_with": "retry_on"}},
        },
    },
    "fault": {
        "type": "dict",
        "minlength": 1,
        "schema": {
            "delay": {"type": "dict", "schema": {"fixed": {**_duration, "required": True}, "percent": _percent}},
            "abort": {"type": "dict", "check_with": "abort", "schema": {"status": _status, "grpcStatus": {"type": "string", "allowed": GRPC_STATUSES},
                                                 "percent": _percent}},
        },
    },
    "mirror": {
        "type": "dict",
        "minlength": 1,
        "schema": {"version": _label,
                   "service": {"type": "string", "regex": SERVICE_KEY, "meta": {"what": "a service key NAMESPACE/NAME"}},
                   "percent": _percent},
    },
    "headers": {"type": "dict", "schema": {"request": _header_ops, "response": _header_ops}},
    "cors": {
        "type": "dict",
        "schema": {
            "allowOrigins": {"type": "list", "minlength": 1, "schema": _string_match},
            "allowMethods": _methods,
            "allowHeaders": {"type": "list", "schema": _header_name},
            "exposeHeaders": {"type": "list", "schema": _header_name},
            "maxAge": _duration,
            "allowCredentials": {"type": "boolean"},
        },
    },
}
_traffic = {
    "type": "dict",
    "schema": {
        "stable": _label,
        "canary": {
            "type": "dict",
            "schema": {
                "version": {**_label, "required": True},
                "weight": {"type": "integer", "required": True, "min": 0, "max": 100},
                "match": {"type": "dict", "schema": {"headers": {**_header_matches, "required": True}}},
                # Delivery through git (`meshc canary`): the weights it moves through, and the check before each.
                "steps": {"type": "list", "minlength": 1, "schema": {"type": "integer", "min": 1, "max": 100}},
                "analysis": {"type": "dict", "schema": {
                    "successRate": {"type": "dict", "schema": {"min": {**_percent, "required": True}}},
                    "latencyP99": {"type": "dict", "schema": {"max": {**_duration, "required": True}}},
                    "interval": {**_duration, "required": True},
                    "minRequests": {"type": "integer", "min": 0},
                }},
                "halted": {"type": "string"},  # written by a rollback; later runs leave the canary alone
            },
        },
        "split": {"type": "dict", "minlength": 1, "keysrules": _label, "valuesrules": {"type": "integer", "min": 0, "max": 100}},
    },
}
_ROUTE = {
    "match": {
        "type": "dict",
        "schema": {
            "path": _one_of(exact=_path, prefix=_path, regex={"type": "string"}),
            "methods": _methods,
            "headers": _header_matches,
            "query": {"type": "dict", "minlength": 1, "keysrules": {"type": "string", "minlength": 1},
                      "valuesrules": _one_of(exact={"type": "string"}, regex={"type": "string"})},
        },
    },
    "traffic": _traffic,
    "redirect": {
        "type": "dict",
        "check_with": "redirect",
        "schema": {"path": _path, "scheme": {"type": "string", "allowed": ("http", "https")},
                   "host": {"type": "string", "regex": DNS1123_SUBDOMAIN, "meta": {"what": "a host name"}},
                   "port": _port, "code": {"type": "integer", "allowed": REDIRECT_CODES}},
    },
    "directResponse": {"type": "dict", "schema": {"status": {**_status, "required": True}, "body": {"type": "string"}}},
    "rewrite": {
        "type": "dict",
        "minlength": 1,
        "schema": {
            "prefix": _path,
            "regex": {"type": "dict", "schema": {"match": {"type": "string", "required": True},
                                                 "substitute": {"type": "string", "required": True}}},
            "authority": {"type": "string", "regex": rf"{DNS1123_SUBDOMAIN}(:[0-9]{{1,5}})?", "meta": {"what": "a host name (HOST or HOST:PORT)"}},
        },
    },
    **_HTTP_POLICY,
}

SPEC = {
    "selector": {**_labels, "minlength": 1},  # or `external`: `check` wants exactly one
    "external": {"type": "dict", "schema": {
        "hosts": {"type": "list", "required": True, "minlength": 1, "maxlength": 1,
                  "schema": {"type": "string", "regex": DNS1123_SUBDOMAIN, "meta": {"what": "a host name such as api.payments.example"}}},
        "resolution": {"type": "string", "allowed": ("DNS", "STATIC")},
    }},
    "ports": {
        "type": "list",
        "required": True,
        "minlength": 1,
        "schema": {
            "type": "dict",
            "schema": {
                "name": {**_label, "required": True},
                "port": {**_port, "required": True},
                "targetPort": _port,
                "protocol": {"type": "string", "allowed": PROTOCOLS},
            },
        },
    },
    "versions": {
        "type": "dict",
        "keysrules": _label,
        "valuesrules": {"type": "dict", "schema": {"labels": {**_labels, "required": True, "minlength": 1}}},
    },
    "traffic": _traffic,
    "routes": {"type": "dict", "keysrules": _label, "valuesrules": {"type": "dict", "check_with": "route", "schema": _ROUTE}},
    **_HTTP_POLICY,
    "loadBalancer": {
        # A scalar (ROUND_ROBIN, ...) or a mapping: `schema` applies to the mapping form only.
        "type": ["string", "dict"],
        "minlength": 1,
        "check_with": "load_balancer",
        "schema": {
            "simple": {"type": "string", "allowed": SIMPLE_LB},
            "warmup": _duration,
            "consistentHash": {"type": "dict", "check_with": "consistent_hash"},
        },
    },
    "connectionPool": {
        "type": "dict",
        "schema": {
            "tcp": {
                "type": "dict",
                "schema": {
                    "maxConnections": _positive,
                    "connectTimeout": _duration,
                    "tcpKeepalive": {"type": "dict", "schema": {"time": _seconds, "interval": _seconds, "probes": _positive}},
                },
            },
            "http": {
                "type": "dict",
                "schema": {
                    "http1MaxPendingRequests": _positive,
                    "http2MaxRequests": _positive,
                    "maxRequestsPerConnection": _count,
                    "maxRetries": _count,
                    "idleTimeout": _duration,
                    "h2UpgradePolicy": {"type": "string", "allowed": H2_UPGRADE_POLICIES},
                },
            },
        },
    },
    "outlierDetection": {
        "type": "dict",
        "schema": {
            "consecutive5xxErrors": _count,
            "interval": _duration,
            "baseEjectionTime": _duration,
            "maxEjectionPercent": {"type": "integer", "min": 0, "max": 100},
        },
    },
    "tls": {
        "type": "dict",
        "check_with": "tls",
        "schema": {
            "mode": {"type": "string", "required": True, "allowed": TLS_MODES},
            "credentialName": {"type": "string", "regex": DNS1123_SUBDOMAIN, "meta": {"what": "a Kubernetes secret name"}},
            "sni": {"type": "string", "regex": HOSTNAME, "meta": {"what": "a host name"}},
            "subjectAltNames": {"type": "list", "schema": {"type": "string"}},
        },
    },
    "egress": {"type": "list", "schema": {"type": "string", "regex": rf"{DNS1123_LABEL}/({DNS1123_LABEL}|\*)",
                                          "meta": {"what": "a service NAMESPACE/NAME, or NAMESPACE/* for all of one namespace"}}},
    "ingress": {
        "type": "dict",
        "schema": {
            "hosts": {
                "type": "list",
                "required": True,
                "minlength": 1,
                "schema": {"type": "string", "regex": HOSTNAME, "meta": {"what": "a host name such as shop.example.com or *.example.com"}},
            },
            "port": _port,
            "paths": {"type": "list", "minlength": 1, "schema": _path},
            "tls": {"type": "dict", "schema": {
                "mode": {"type": "string", "required": True, "allowed": ("SIMPLE", "MUTUAL")},
                "credentialName": {"type": "string", "required": True, "regex": DNS1123_SUBDOMAIN,
                                   "meta": {"what": "a Kubernetes Secret name"}},
            }},
            "httpsRedirect": {"type": "boolean"},
        },
    },
}

#: A DestinationRule trafficPolicy's fields. A version's `policy` (its subset's trafficPolicy) and a
#: port's (its portLevelSettings entry) take these four with the very rules of the spec's own.
TRAFFIC_POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
_traffic_policy = {"type": "dict", "schema": {name: SPEC[name] for name in TRAFFIC_POLICY_FIELDS}}
SPEC["ports"]["schema"]["schema"]["policy"] = _traffic_policy
SPEC["versions"]["valuesrules"]["schema"]["policy"] = _traffic_policy


def _partial(schema: dict) -> dict:
    """The schema of a fragment merged over a spec: nothing required, `null` allowed (it removes a key)."""
    out = {}
    for name, rules in schema.items():
        rules = {k: v for k, v in rules.items() if k != "required"}
        rules["nullable"] = True
        if isinstance(rules.get("schema"), dict) and "dict" in _types(rules):
            rules["schema"] = _partial(rules["schema"])
        if rules.get("type") == "dict" and "valuesrules" in rules:
            # an override removes one entry of a mapping (a split weight, a label) with `null`
            values = {**rules["valuesrules"], "nullable": True}
            if isinstance(values.get("schema"), dict):
                values["schema"] = _partial(values["schema"])
            rules["valuesrules"] = values
        out[name] = rules
    return out


def _types(rules: dict) -> tuple:
    kind = rules.get("type")
    return tuple(kind) if isinstance(kind, list) else (kind,)


PARTIAL_SPEC = _partial(SPEC)

_metadata_named = {"name": {**_label, "required": True}}

POLICY = {
    "apiVersion": {"type": "string", "required": True, "allowed": (API_VERSION,)},
    "kind": {"type": "string", "required": True, "allowed": ("TrafficPolicy",)},
    "metadata": {
        "type": "dict",
        "required": True,
        "schema": {
            # The name becomes a Kubernetes Service name, which must also start with a letter.
            "name": {"type": "string", "required": True, "regex": DNS1035_LABEL,
                     "meta": {"what": "a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most 63)"}},
            "namespace": {**_label, "required": True},
        },
    },
    "spec": {"type": "dict", "required": True, "schema": SPEC},
}

ENVIRONMENT = {
    "apiVersion": {"type": "string", "required": True, "allowed": (API_VERSION,)},
    "kind": {"type": "string", "required": True, "allowed": ("Environment",)},
    "metadata": {"type": "dict", "required": True, "schema": _metadata_named},
    "spec": {
        "type": "dict",
        "required": True,
        "schema": {
            "clusterDomain": {"type": "string", "regex": DNS1123_SUBDOMAIN, "meta": {"what": "a DNS domain such as cluster.local"}},
            "defaults": {"type": "dict", "schema": PARTIAL_SPEC},
            "overrides": {
                "type": "dict",
                "keysrules": {"type": "string", "regex": SERVICE_KEY, "meta": {"what": "a service key NAMESPACE/NAME"}},
                "valuesrules": {"type": "dict", "schema": PARTIAL_SPEC},
            },
            "patches": {
                "type": "list",
                "schema": {
                    "type": "dict",
                    "schema": {
                        "target": {
                            "type": "dict",
                            "required": True,
                            "schema": {
                                "kind": {"type": "string", "required": True, "allowed": PATCH_KINDS},
                                "namespace": _label,
                                "name": {"type": "string", "required": True},
                            },
                        },
                        "ops": {
                            "type": "list",
                            "required": True,
                            "minlength": 1,
                            "schema": {
                                "type": "dict",
                                "schema": {
                                    "op": {"type": "string", "required": True, "allowed": PATCH_OPS},
                                    "path": {"type": "string", "required": True},
                                    "from": {"type": "string"},
                                    "value": {"nullable": True},
                                },
                            },
                        },
                    },
                },
            },
            "endpoints": {
                "type": "dict",
                "keysrules": {"type": "string", "regex": SERVICE_KEY, "meta": {"what": "a service key NAMESPACE/NAME"}},
                "valuesrules": {"type": ["list", "dict"], "check_with": "endpoints"},
            },
            "gateway": {"type": "dict", "schema": {"selector": {**_labels, "minlength": 1}}},
            "envoy": {"type": "dict", "schema": {"listenerAddress": {"type": "string", "check_with": "ip"}}},
            "metrics": {"type": "dict", "schema": {
                "prometheus": {"type": "string", "required": True, "regex": r"https?://[^\s/]+(/\S*)?",
                               "meta": {"what": "an http:// or https:// URL"}},
                "source": {"type": "string", "required": True, "allowed": ("envoy", "istio")},
            }},
            "freeze": {"type": "list", "schema": {"type": "dict", "schema": {
                "from": {"type": "string", "required": True}, "to": {"type": "string", "required": True}}}},
        },
    },
}


# -- the fast path ----------------------------------------------------------------------

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}
_regex_cache: dict[str, re.Pattern] = {}


def _fast_ok(value, rules: dict) -> bool:
    """Whether cerberus would accept `value` under `rules` (the subset of rules used above)."""
    if value is None:
        return rules.get("nullable", False)
    kind = rules.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else (kind,)
        if not any(_TYPES[k](value) for k in kinds):
            return False
    if "allowed" in rules and value not in rules["allowed"]:
        return False
    if "regex" in rules:
        pattern = _regex_cache.get(rules["regex"]) or _regex_cache.setdefault(rules["regex"], re.compile(rules["regex"]))
        if not pattern.fullmatch(value):
            return False
    if "min" in rules and value < rules["min"] or "max" in rules and value > rules["max"]:
        return False
    if "minlength" in rules and len(value) < rules["minlength"] or "maxlength" in rules and len(value) > rules["maxlength"]:
        return False
    if "check_with" in rules and CHECKS[rules["check_with"]](value) is not None:
        return False
    sub = rules.get("schema")
    if sub is not None:
        if isinstance(value, dict):
            if not _fast_mapping_ok(value, sub):
                return False
        elif isinstance(value, list) and not all(_fast_ok(item, sub) for item in value):
            return False  # as cerberus, `schema` means nothing for a scalar (loadBalancer: ROUND_ROBIN)
    if "keysrules" in rules and not all(_fast_ok(k, rules["keysrules"]) for k in value):
        return False
    if "valuesrules" in rules and not all(_fast_ok(v, rules["valuesrules"]) for v in value.values()):
        return False
    return True


def _fast_keys_ok(mapping: dict, schema: dict, keys: set) -> bool:
    for key in keys:
        if key in mapping and (key not in schema or not _fast_ok(mapping[key], schema[key])):
            return False
    return all(key in mapping for key, rules in schema.items() if rules.get("required"))


def _fast_mapping_ok(mapping: dict, schema: dict) -> bool:
    for key, value in mapping.items():
        rules = schema.get(key)
        if rules is None or not _fast_ok(value, rules):
            return False
    return all(key in mapping for key, rules in schema.items() if rules.get("required"))


# -- cerberus, for the messages -----------------------------------------------------------


@lru_cache(maxsize=1)
def _validator_class():
    """cerberus' Validator with our rules; imported on the first invalid document only (~30 ms)."""
    import cerberus
    from cerberus import errors as cerrors

    class _Validator(cerberus.Validator):
        # cerberus counts booleans as integers; YAML users mean `weight: true` as a mistake.
        types_mapping = {
            **cerberus.Validator.types_mapping,
            "integer": cerberus.TypeDefinition("integer", (int,), (bool,)),
            "number": cerberus.TypeDefinition("number", (int, float), (bool,)),
        }

        def _check(self, name, field, value):
            # cerberus runs check_with even on a null (nullable or not); the nullable rule has
            # answered for it already, as in the fast path. CHECKS functions take non-null values.
            if value is not None:
                message = CHECKS[name](value)
                if message:
                    self._error(field, message)

        def _validate_regex(self, pattern, field, value):
            """{'type': 'string'}"""
            # cerberus matches with `pattern + "$"`, which lets a trailing newline through
            # ("web\n"); the fast path and Kubernetes both need the whole string to match.
            if isinstance(value, str) and not re.fullmatch(pattern, value):
                self._error(field, cerrors.REGEX_MISMATCH)

        def _validate_meta(self, constraint, field, value):
            """{'type': 'dict'}"""  # schema for cerberus' own schema check: meta carries our wording

    # `check_with: NAME` calls `_check_with_NAME`, which cerberus' metaclass must see when it makes the class.
    checkers = {f"_check_with_{name}": _checker(name) for name in CHECKS}
    return type("Validator", (_Validator,), checkers)


def _checker(name: str):
    return lambda self, field, value: self._check(name, field, value)


def validate(
    data: dict, schema: dict, spans: SpanMap, diags: Diagnostics, note: Callable | None = None, only: set | None = None
) -> bool:
    """Validate one document; report every problem with its span. True when valid.

    `note(path) -> Note | None` adds a note to each diagnostic (used for overlays:
    where the policy set the value an environment overrides). `only` names the
    top-level keys that may be invalid (the rest is known valid): the fast path
    then checks just those, and that every required key is present.
    """
    if only is None:
        if _fast_mapping_ok(data, schema):
            return True
    elif _fast_keys_ok(data, schema, only):
        return True
    validator = _validator_class()(schema)
    if validator.validate(data):
        # Both read the same schema; a disagreement is a bug, never a silently dropped document.
        raise AssertionError("schema fast path rejected a document cerberus accepts")
    for error in _leaves(validator._errors):
        _report(error, schema, spans, diags, note)
    return False


def _leaves(errors):
    for error in errors:
        if error.is_group_error:
            yield from _leaves(error.child_errors)
        else:
            yield error


def _report(error, schema: dict, spans: SpanMap, diags: Diagnostics, note: Callable | None) -> None:
    from cerberus import errors as cerrors

    path = tuple(error.document_path)
    field = path[-1] if path else ""
    notes = [n for n in [note(path)] if n] if note else []
    code = error.code
    if code == cerrors.UNKNOWN_FIELD.code:
        known = _known_fields(schema, path[:-1])
        message = f"unknown field {field!r}" + _did_you_mean(str(field), known)
        diags.error("schema.unknown-field", message, spans.key_at(path), *notes)
    elif code == cerrors.REQUIRED_FIELD.code:
        where = f"{_name(path[:-1])}: " if len(path) > 1 else ""
        removed = spans.removed_at(path)
        if removed:
            diags.error("schema.missing-field", f"{where}required field {field!r} is removed by this null", removed, *notes)
        else:
            diags.error("schema.missing-field", f"{where}missing required field {field!r}", spans.key_at(path[:-1]), *notes)
    elif code == cerrors.BAD_TYPE.code:
        diags.error("schema.type", f"{_name(path)}: expected {_type_words(error.constraint)}, got {_describe(error.value)}", spans.at(path), *notes)
    elif code == cerrors.UNALLOWED_VALUE.code:
        message = _not_one_of(error.value, error.constraint)
        diags.error("schema.value", f"{_name(path)}: {message}", spans.at(path), *notes)
    elif code in (cerrors.MIN_VALUE.code, cerrors.MAX_VALUE.code):
        rules = _rules_at(schema, path)
        bounds = f"between {rules['min']} and {rules['max']}" if "min" in rules and "max" in rules else (f"at least {rules['min']}" if "min" in rules else f"at most {rules.get('max')}")
        diags.error("schema.range", f"{_name(path)}: {error.value} is out of range: must be {bounds}", spans.at(path), *notes)
    elif code in (cerrors.MIN_LENGTH.code, cerrors.MAX_LENGTH.code):
        what = "must not be empty" if code == cerrors.MIN_LENGTH.code else f"takes at most {error.constraint} entry"
        diags.error("schema.length", f"{_name(path)}: {what}", spans.at(path), *notes)
    elif code == cerrors.REGEX_MISMATCH.code:
        what = _meta_what(schema, error.schema_path)
        diags.error("schema.format", f"{_name(path)}: {error.value!r} is not {what or 'valid'}", _regex_span(error, spans, path), *notes)
    elif code == cerrors.CUSTOM.code:
        diags.error("schema.value", f"{_name(path)}: {error.info[0] if error.info else 'invalid value'}", spans.at(path), *notes)
    elif code == cerrors.NOT_NULLABLE.code:
        diags.error("schema.null", f"{_name(path)}: must not be null", spans.at(path), *notes)
    else:
        diags.error("schema.invalid", f"{_name(path)}: invalid value ({error.rule})", spans.at(path), *notes)


def _regex_span(error, spans: SpanMap, path: tuple):
    # A keysrules failure is about the key itself: point at the key, not its value.
    if "keysrules" in error.schema_path:
        return spans.key_at(path)
    return spans.at(path)


def _name(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "document"


def _rules_at(schema: dict, path: tuple) -> dict:
    """The rules that apply at a document path (best effort: for messages only)."""
    rules: dict = {"type": "dict", "schema": schema}
    for part in path:
        if isinstance(part, int):
            rules = rules.get("schema", {})
        elif isinstance(rules.get("schema"), dict) and part in rules["schema"]:
            rules = rules["schema"][part]
        elif "valuesrules" in rules:
            rules = rules["valuesrules"]
        else:
            return {}
    return rules


def _known_fields(schema: dict, path: tuple) -> list[str]:
    rules = _rules_at(schema, path)
    sub = rules.get("schema")
    if isinstance(sub, dict) and rules.get("type") != "list":
        return sorted(sub)
    return []


def _meta_what(schema: dict, schema_path: tuple) -> str | None:
    """The `meta.what` wording beside the rule a regex error came from."""
    node: object = schema
    for part in schema_path[:-1]:  # the last part is "regex" itself
        node = node.get(part) if isinstance(node, dict) else None
    return node.get("meta", {}).get("what") if isinstance(node, dict) else None


def _did_you_mean(word: str, choices) -> str:
    return did_you_mean(word, choices, "; expected one of: " + ", ".join(choices) if choices else "")


def _not_one_of(value, allowed) -> str:
    return f"{value!r} is not one of {', '.join(map(str, allowed))}{did_you_mean(value, allowed)}"


def _type_words(constraint) -> str:
    words = {"string": "a string", "integer": "an integer", "boolean": "true or false", "dict": "a mapping", "list": "a list",
             "number": "a number"}
    kinds = constraint if isinstance(constraint, (list, tuple)) else [constraint]
    return " or ".join(words.get(k, k) for k in kinds)


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
