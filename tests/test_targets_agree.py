"""The two targets mean the same thing, route by route.

For every compiling golden case and the example repository, each mesh
VirtualService route (`http[]` entry) is read the way istiod reads it, and
compared with the Envoy route of the same name in the route configuration of
its port: the match, the action (destinations and weights, a redirect, a
direct response), timeout, retry policy, rewrite, mirror, fault, header
operations and CORS. istiod's translation is written here once, from its
source, so the test holds both targets to Istio rather than to each other:
https://github.com/istio/istio/blob/master/pilot/pkg/networking/core/route/retry/retry.go
(`DefaultPolicy`, `ConvertPolicy`, `parseRetryOn`; EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY
defaults to true since Istio 1.24, so the default retries no status code) and
https://github.com/istio/istio/blob/master/pilot/pkg/networking/core/route/route.go
(`TranslateRouteMatch`, `ApplyRedirect`, `translateFault`, `TranslateCORSPolicy`,
`TranslateHeadersOperations`, mirror percentages as parts per million).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from pathlib import Path

import pytest
import yaml

from conftest import GOLDEN, REPO

ISTIO_DEFAULT_RETRY = {"retry_on": {"connect-failure", "refused-stream", "unavailable", "cancelled",
                                    "retriable-status-codes"},
                       "retriable_status_codes": [], "num_retries": 2, "per_try_timeout": None}


def _rendered_trees() -> dict[str, Path]:
    trees = {f"examples/{p.name}": p for p in sorted((REPO / "rendered").iterdir()) if p.is_dir()}
    for case in sorted(GOLDEN.iterdir()):
        for env in sorted((case / "expected").iterdir()) if (case / "expected").is_dir() else ():
            trees[f"{case.name}/{env.name}"] = env
    return trees


#: An environment's `patches` edit one target's output on purpose (the Istio objects, or the
#: Envoy resources): there the targets differ by the user's hand, not by meshc's.
PATCHED = {"overlays/prod", "envoy-patches/prod"}
TREES = {name: tree for name, tree in _rendered_trees().items() if name not in PATCHED}


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    number, unit = re.fullmatch(r"([\d.]+)(ms|s|m|h)", text).groups()
    return round(float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit], 6)


def _istio_retry(retries: dict | None, hashing: bool) -> dict | None:
    """istiod's ConvertPolicy, reduced to what a route means: conditions, codes, count, per-try timeout."""
    policy = {**ISTIO_DEFAULT_RETRY, "retry_on": set(ISTIO_DEFAULT_RETRY["retry_on"]), "previous_hosts": not hashing}
    if retries is None:
        return policy
    if retries.get("attempts", 0) <= 0:
        return None
    policy["num_retries"] = retries["attempts"]
    if retries.get("retryOn"):
        parts = [p.strip() for p in retries["retryOn"].split(",") if p.strip()]
        codes = [int(p) for p in parts if p.isdigit() and int(p) in HTTPStatus._value2member_map_]
        conditions = {p for p in parts if not (p.isdigit() and int(p) in HTTPStatus._value2member_map_)}
        if codes:
            conditions.add("retriable-status-codes")
        policy["retry_on"], policy["retriable_status_codes"] = conditions, codes
    policy["per_try_timeout"] = _seconds(retries.get("perTryTimeout"))
    return policy


def _envoy_retry(policy: dict | None) -> dict | None:
    if policy is None:
        return None
    return {"retry_on": set(policy["retry_on"].split(",")), "retriable_status_codes": policy.get("retriable_status_codes", []),
            "num_retries": policy["num_retries"], "per_try_timeout": _seconds(policy.get("per_try_timeout")),
            "previous_hosts": any(p["name"] == "envoy.retry_host_predicates.previous_hosts"
                                  for p in policy.get("retry_host_predicate", ()))}


def _istio_destinations(route: dict, port: int) -> dict[str, int]:
    out = {}
    for d in route["route"]:
        dest = d["destination"]
        number = dest.get("port", {}).get("number", port)
        out[f"outbound|{number}|{dest.get('subset', '')}|{dest['host']}"] = d.get("weight", 100)
    return out


def _envoy_destinations(action: dict) -> dict[str, int]:
    if "cluster" in action:
        return {action["cluster"]: 100}
    return {c["name"]: c["weight"] for c in action["weighted_clusters"]["clusters"]}


def _istio_routes(tree: Path) -> dict[tuple[str, int, str], dict]:
    """(fqdn, port, route name) → what the mesh VirtualService's route means."""
    out = {}
    for path in sorted((tree / "istio").rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        for doc in docs:
            if doc["kind"] == "ServiceEntry":
                out.update(_istio_external_routes(doc, by_kind))
                continue
            if doc["kind"] != "VirtualService" or doc["spec"].get("gateways"):
                continue  # gateway-bound routes are the ingress's
            fqdn = doc["spec"]["hosts"][0]
            service = by_kind[("Service", doc["metadata"]["name"])]
            rule = by_kind.get(("DestinationRule", doc["metadata"]["name"]), {"spec": {}})
            lb = rule["spec"].get("trafficPolicy", {}).get("loadBalancer", {})
            hashing = "consistentHash" in lb
            ports = [p["port"] for p in service["spec"]["ports"]]
            for route in doc["spec"].get("http", ()):
                matched = [m["port"] for m in route.get("match", ()) if "port" in m]
                for port in matched or ports:
                    out[(fqdn, port, route["name"])] = _istio_meaning(route, port, hashing)
    return out


def _istio_external_routes(entry: dict, by_kind: dict) -> dict[tuple[str, int, str], dict]:
    """A ServiceEntry with no VirtualService: istiod routes each HTTP port of its host to it as is."""
    rule = by_kind.get(("DestinationRule", entry["metadata"]["name"]), {"spec": {}})
    hashing = "consistentHash" in rule["spec"].get("trafficPolicy", {}).get("loadBalancer", {})
    [host] = entry["spec"]["hosts"]
    return {(host, p["number"], "default"): _istio_meaning({"name": "default", "route": [{"destination": {"host": host}}]},
                                                           p["number"], hashing)
            for p in entry["spec"]["ports"] if p["protocol"] in ("HTTP", "HTTP2", "GRPC")}


def _istio_meaning(route: dict, port: int, hashing: bool) -> dict:
    meaning = {"match": _istio_match(route.get("match", [{}])[0]),
               "headers": _istio_header_ops(route.get("headers", {})),
               "cors": _istio_cors(route.get("corsPolicy"))}
    if "redirect" in route:
        r = route["redirect"]
        return {**meaning, "redirect": _location(r.get("scheme"), r.get("authority"), r.get("port"), r.get("uri"),
                                                 r.get("redirectCode", 301))}
    if "directResponse" in route:
        d = route["directResponse"]
        return {**meaning, "direct_response": (d["status"], d.get("body", {}).get("string"))}
    rewrite = route.get("rewrite", {})
    regex = rewrite.get("uriRegexRewrite")
    mirror = route.get("mirror")
    mirror_percent = route.get("mirrorPercentage", {}).get("value", 100)  # istiod: a mirror alone is 100%
    return {**meaning,
            "destinations": _istio_destinations(route, port),
            "timeout": _seconds(route.get("timeout")) or 0.0,  # istiod: no timeout is 0s
            "retry": _istio_retry(route.get("retries"), hashing),
            "rewrite": (rewrite.get("uri"), regex and (regex["match"], regex["rewrite"]), rewrite.get("authority")),
            "mirror": (f"outbound|{mirror.get('port', {}).get('number', port)}|{mirror.get('subset', '')}|{mirror['host']}",
                       _ppm(mirror_percent)) if mirror and mirror_percent > 0 else None,
            "fault": _istio_fault(route.get("fault"))}


def _istio_match(match: dict) -> dict:
    """TranslateRouteMatch: no uri is `prefix: /`; the method is the `:method` header; `{}` is presence."""
    uri = match.get("uri", {"prefix": "/"})
    headers = {(name, *_istio_string(m)) for name, m in match.get("headers", {}).items()}
    if "method" in match:
        headers.add((":method", *_istio_string(match["method"])))
    return {"path": _istio_string(uri), "headers": headers,
            "query": {(name, *_istio_string(m)) for name, m in match.get("queryParams", {}).items()}}


def _istio_string(match: dict) -> tuple:
    if not match:
        return ("present", True)
    (kind, value), = match.items()
    return (kind, value)


def _istio_header_ops(headers: dict) -> dict:
    out = {}
    for side in ("request", "response"):
        ops = headers.get(side, {})
        out[side] = ({(k, v, "OVERWRITE_IF_EXISTS_OR_ADD") for k, v in ops.get("set", {}).items()}
                     | {(k, v, "APPEND_IF_EXISTS_OR_ADD") for k, v in ops.get("add", {}).items()},
                     sorted(ops.get("remove", ())))
    return out


def _istio_cors(cors: dict | None) -> dict | None:
    if cors is None:
        return None
    return {"origins": [_istio_string(o) for o in cors.get("allowOrigins", ())],
            "methods": cors.get("allowMethods", []), "headers": cors.get("allowHeaders", []),
            "expose": cors.get("exposeHeaders", []),
            "max_age": cors.get("maxAge") and int(_seconds(cors["maxAge"])),
            "credentials": cors.get("allowCredentials")}


#: gRPC status codes by number (google.rpc.Code), as istiod turns `grpcStatus` names into numbers.
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def _istio_fault(fault: dict | None) -> dict | None:
    if fault is None:
        return None
    out = {}
    if "delay" in fault:
        delay = fault["delay"]
        out["delay"] = (_seconds(delay["fixedDelay"]), _ppm(delay.get("percentage", {}).get("value", 100)))
    if "abort" in fault:
        abort = fault["abort"]
        code = ("http", abort["httpStatus"]) if "httpStatus" in abort else ("grpc", GRPC_CODES.index(abort["grpcStatus"]))
        out["abort"] = (*code, _ppm(abort.get("percentage", {}).get("value", 100)))
    return out


def _ppm(percent: float) -> int:
    """translatePercentToFractionalPercent: a percentage as parts per million, truncated."""
    return int(percent * 10000)


def _location(scheme: str | None, host: str | None, port: int | None, path: str | None, code: int) -> tuple:
    """Where a redirect sends, and how: a port that is its scheme's default names the same place."""
    if (scheme, port) in (("http", 80), ("https", 443)):
        port = None
    return (scheme, host, port, path, code)


def _envoy_routes(tree: Path) -> dict[tuple[str, int, str], dict]:
    out = {}
    routes = json.loads((tree / "envoy" / "routes.json").read_text())["resources"]
    for config in routes:
        if not config["name"].isdigit():
            continue  # http.PORT: the gateway's
        port = int(config["name"])
        for host in config["virtual_hosts"]:
            fqdn = host["name"].rsplit(":", 1)[0]
            for route in host["routes"]:
                out[(fqdn, port, route["name"])] = _envoy_meaning(route)
    return out


_ENVOY_CODES = {"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303, "TEMPORARY_REDIRECT": 307,
                "PERMANENT_REDIRECT": 308}


def _envoy_meaning(route: dict) -> dict:
    per_filter = route.get("typed_per_filter_config", {})
    meaning = {"match": _envoy_match(route["match"]),
               "headers": {side: ({(h["header"]["key"], h["header"]["value"], h["append_action"])
                                   for h in route.get(f"{side}_headers_to_add", ())},
                                  sorted(route.get(f"{side}_headers_to_remove", ())))
                           for side in ("request", "response")},
               "cors": _envoy_cors(per_filter.get("envoy.filters.http.cors"))}
    if "redirect" in route:
        r = route["redirect"]
        scheme = "https" if r.get("https_redirect") else r.get("scheme_redirect")
        return {**meaning, "redirect": _location(scheme, r.get("host_redirect"), r.get("port_redirect"),
                                                 r.get("path_redirect"), _ENVOY_CODES[r.get("response_code", "MOVED_PERMANENTLY")])}
    if "direct_response" in route:
        d = route["direct_response"]
        return {**meaning, "direct_response": (d["status"], d.get("body", {}).get("inline_string"))}
    action = route["route"]
    regex = action.get("regex_rewrite")
    mirrors = action.get("request_mirror_policies", ())
    assert len(mirrors) <= 1 and all(m["trace_sampled"] is False for m in mirrors)
    return {**meaning,
            "destinations": _envoy_destinations(action),
            "timeout": _seconds(action.get("timeout")),
            "retry": _envoy_retry(action.get("retry_policy")),
            "rewrite": (action.get("prefix_rewrite"), regex and (regex["pattern"]["regex"], regex["substitution"]),
                        action.get("host_rewrite_literal")),
            "mirror": (mirrors[0]["cluster"], _envoy_ppm(mirrors[0]["runtime_fraction"]["default_value"])) if mirrors else None,
            "fault": _envoy_fault(per_filter.get("envoy.filters.http.fault"))}


def _envoy_match(match: dict) -> dict:
    (kind, value), = ((k, v) for k, v in match.items() if k in ("prefix", "path", "safe_regex"))
    path = ("regex", value["regex"]) if kind == "safe_regex" else ({"path": "exact"}.get(kind, kind), value)
    return {"path": path, "headers": {(h["name"], *_envoy_string(h)) for h in match.get("headers", ())},
            "query": {(q["name"], *_envoy_string(q["string_match"])) for q in match.get("query_parameters", ())}}


def _envoy_string(match: dict) -> tuple:
    if match.get("present_match"):
        return ("present", True)
    match = match.get("string_match", match)
    (kind, value), = match.items()
    return ("regex", value["regex"]) if kind == "safe_regex" else (kind, value)


def _envoy_ppm(fraction: dict) -> int:
    per = {"HUNDRED": 10000, "TEN_THOUSAND": 100, "MILLION": 1}[fraction.get("denominator", "HUNDRED")]
    return fraction.get("numerator", 0) * per


def _envoy_cors(cors: dict | None) -> dict | None:
    if cors is None:
        return None
    assert cors["filter_enabled"]["default_value"] == {"numerator": 100, "denominator": "HUNDRED"}
    split = lambda key: cors[key].split(",") if key in cors else []  # noqa: E731
    return {"origins": [_envoy_string(o) for o in cors.get("allow_origin_string_match", ())],
            "methods": split("allow_methods"), "headers": split("allow_headers"), "expose": split("expose_headers"),
            "max_age": cors.get("max_age") and int(cors["max_age"]), "credentials": cors.get("allow_credentials")}


def _envoy_fault(fault: dict | None) -> dict | None:
    if fault is None:
        return None
    out = {}
    if "delay" in fault:
        out["delay"] = (_seconds(fault["delay"]["fixed_delay"]), _envoy_ppm(fault["delay"]["percentage"]))
    if "abort" in fault:
        abort = fault["abort"]
        code = ("http", abort["http_status"]) if "http_status" in abort else ("grpc", abort["grpc_status"])
        out["abort"] = (*code, _envoy_ppm(abort["percentage"]))
    return out


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_route_means_the_same_in_both_targets(tree):
    istio, envoy = _istio_routes(TREES[tree]), _envoy_routes(TREES[tree])
    http_services = {fqdn for fqdn, _, _ in envoy}
    istio = {k: v for k, v in istio.items() if k[0] in http_services and (k[0], k[1]) in {(f, p) for f, p, _ in envoy}}
    assert sorted(istio) == sorted(envoy), "the same routes, by service, port and name"
    for key in istio:
        assert envoy[key] == istio[key], key


def _istio_gateway_routes(tree: Path) -> dict[tuple[str, int], list[dict]]:
    """(ingress host, gateway port) → what each route of its gateway-bound VirtualService means, in order.
    A route's destination port and hashing are its service's (a shared host routes to several)."""
    docs = [d for path in sorted((tree / "istio").rglob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    services = {f"{d['metadata']['name']}.{d['metadata']['namespace']}.svc.cluster.local": d for d in docs if d["kind"] == "Service"}
    hashing = {d["spec"]["host"] for d in docs if d["kind"] == "DestinationRule"
               and "consistentHash" in d["spec"].get("trafficPolicy", {}).get("loadBalancer", {})}
    gateways = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs if d["kind"] == "Gateway"}
    out: dict[tuple[str, int], list[dict]] = {}
    for doc in docs:
        if doc["kind"] != "VirtualService" or not doc["spec"].get("gateways"):
            continue
        [name] = doc["spec"]["gateways"]
        for server in gateways[(doc["metadata"]["namespace"], name)]["spec"]["servers"]:
            number = server["port"]["number"]
            for host in doc["spec"]["hosts"]:
                assert host in server["hosts"] and (host, number) not in out, "one VirtualService per host"
                if server.get("tls", {}).get("httpsRedirect"):
                    out[(host, number)] = [ISTIO_HTTPS_REDIRECT]  # istiod answers the whole server so
                    continue
                routes = []
                for route in doc["spec"]["http"]:
                    fqdn = route["route"][0]["destination"]["host"] if "route" in route else None
                    port = services[fqdn]["spec"]["ports"][0]["port"] if fqdn else 0
                    routes.append(_istio_meaning(route, port, fqdn in hashing))
                out[(host, number)] = routes
    return out


#: A `tls.httpsRedirect` server: every request answered 301 to the same URL over https.
ISTIO_HTTPS_REDIRECT = {"match": {"path": ("prefix", "/"), "headers": set(), "query": set()},
                        "headers": {"request": (set(), []), "response": (set(), [])}, "cors": None,
                        "redirect": ("https", None, None, None, 301)}


def _envoy_gateway_routes(tree: Path) -> dict[tuple[str, int], list[dict]]:
    out = {}
    for config in json.loads((tree / "envoy" / "routes.json").read_text())["resources"]:
        if config["name"].startswith("http."):
            port = int(config["name"].removeprefix("http."))
            for host in config["virtual_hosts"]:
                out[(host["name"].rsplit(":", 1)[0], port)] = [_envoy_meaning(r) for r in host["routes"]]
    return out


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_gateway_host_routes_the_same_in_both_targets(tree):
    """At the gateway, order is meaning: a host's routes are compared as a list. Where the Envoy
    target leaves a gateway port out, and warns that it does, the two differ by that port."""
    istio, envoy = _istio_gateway_routes(TREES[tree]), _envoy_gateway_routes(TREES[tree])
    for host, port in GATEWAY_LEFT_OUT.get(tree, ()):
        assert (host, port) in istio and (host, port) not in envoy
        del istio[(host, port)]
    assert istio == envoy


#: An ingress port that is also a service port: one listener per port, so no gateway there
#: (`envoy.ingress-port-conflict`, a warning).
GATEWAY_LEFT_OUT = {"warn-envoy-ingress-port-conflict/prod": [("web.example.com", 8080)]}


def test_the_gateway_comparison_covers_https_and_its_redirect():
    gateway = _envoy_gateway_routes(TREES["ingress-https/prod"])
    assert gateway[("shop.example.com", 80)] == [ISTIO_HTTPS_REDIRECT]
    assert [r["match"]["path"] for r in gateway[("shop.example.com", 443)]] == [("prefix", "/api"), ("prefix", "/")]


def test_the_gateway_comparison_covers_a_host_shared_by_path():
    shared = _envoy_gateway_routes(TREES["ingress-shared-host/prod"])[("shop.example.com", 80)]
    destinations = [next(iter(r["destinations"]), None) for r in shared if "destinations" in r]
    assert [r["match"]["path"] for r in shared] == [("prefix", "/api/search"), ("prefix", "/api"), ("prefix", "/api/old"),
                                                    ("prefix", "/api"), ("exact", "/healthz"), ("prefix", "/")]
    assert [d.split("|")[-1].split(".")[0] for d in destinations] == ["search", "api", "api", "storefront"]


def test_the_comparison_covers_routes_with_and_without_retries():
    """The trees hold the cases that matter: a default retry, a policy's own, and hashing."""
    meanings = [r["retry"] for tree in TREES.values() for r in _envoy_routes(tree).values() if "retry" in r]
    assert any(r == {**ISTIO_DEFAULT_RETRY, "previous_hosts": True} for r in meanings)
    assert any(r and r["retry_on"] != ISTIO_DEFAULT_RETRY["retry_on"] for r in meanings)
    assert any(r and not r["previous_hosts"] for r in meanings)
    assert len(TREES) >= 10


def test_the_comparison_covers_every_part_of_a_route():
    """Each part compared above is set somewhere, so none is compared only as absent."""
    routes = [r for tree in TREES.values() for r in _envoy_routes(tree).values()]
    for part in ("redirect", "direct_response", "fault", "mirror", "cors"):
        assert any(r.get(part) for r in routes), part
    assert any(any(r["rewrite"]) for r in routes if "rewrite" in r)
    assert any(r["headers"]["request"] != (set(), []) and r["headers"]["response"] != (set(), []) for r in routes)
    kinds = {kind for r in routes for kind in [r["match"]["path"][0]] + [h[1] for h in r["match"]["headers"]]}
    assert kinds >= {"exact", "prefix", "regex", "present"}
    assert any(r["match"]["query"] for r in routes)


def test_what_is_left_out_is_patched_by_its_environment():
    for name in PATCHED:
        case, env = name.split("/")
        assert "patches:" in (GOLDEN / case / "environments" / f"{env}.yaml").read_text()


def test_the_default_retry_is_istios_since_1_24():
    """A negative control for the reading above: the old default (503 retried) means something else."""
    old = {"retry_on": ",".join(sorted(ISTIO_DEFAULT_RETRY["retry_on"])), "num_retries": 2, "retriable_status_codes": [503],
           "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}]}
    assert _envoy_retry(old) != _istio_retry(None, hashing=False)
