"""The two targets mean the same thing, route by route.

For every compiling golden case and the example repository, each mesh
VirtualService route (`http[]` entry) is read the way istiod reads it, and
compared with the Envoy route of the same name in the route configuration of
its port: destinations and weights, timeout, and retry policy. istiod's
translation is written here once, from its source, so the test holds both
targets to Istio rather than to each other:
https://github.com/istio/istio/blob/master/pilot/pkg/networking/core/route/retry/retry.go
(`DefaultPolicy`, `ConvertPolicy`, `parseRetryOn`; EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY
defaults to true since Istio 1.24, so the default retries no status code).
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
                    out[(fqdn, port, route["name"])] = {
                        "destinations": _istio_destinations(route, port),
                        "timeout": _seconds(route.get("timeout")) or 0.0,  # istiod: no timeout is 0s
                        "retry": _istio_retry(route.get("retries"), hashing)}
    return out


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
                action = route["route"]
                out[(fqdn, port, route["name"])] = {
                    "destinations": _envoy_destinations(action),
                    "timeout": _seconds(action.get("timeout")),
                    "retry": _envoy_retry(action.get("retry_policy"))}
    return out


@pytest.mark.parametrize("tree", sorted(TREES))
def test_every_route_means_the_same_in_both_targets(tree):
    istio, envoy = _istio_routes(TREES[tree]), _envoy_routes(TREES[tree])
    http_services = {fqdn for fqdn, _, _ in envoy}
    istio = {k: v for k, v in istio.items() if k[0] in http_services and (k[0], k[1]) in {(f, p) for f, p, _ in envoy}}
    assert sorted(istio) == sorted(envoy), "the same routes, by service, port and name"
    for key in istio:
        assert envoy[key] == istio[key], key


def test_the_comparison_covers_routes_with_and_without_retries():
    """The trees hold the cases that matter: a default retry, a policy's own, and hashing."""
    meanings = [r["retry"] for tree in TREES.values() for r in _envoy_routes(tree).values()]
    assert any(r == {**ISTIO_DEFAULT_RETRY, "previous_hosts": True} for r in meanings)
    assert any(r and r["retry_on"] != ISTIO_DEFAULT_RETRY["retry_on"] for r in meanings)
    assert any(r and not r["previous_hosts"] for r in meanings)
    assert len(TREES) >= 10


def test_what_is_left_out_is_patched_by_its_environment():
    for name in PATCHED:
        case, env = name.split("/")
        assert "patches:" in (GOLDEN / case / "environments" / f"{env}.yaml").read_text()


def test_the_default_retry_is_istios_since_1_24():
    """A negative control for the reading above: the old default (503 retried) means something else."""
    old = {"retry_on": ",".join(sorted(ISTIO_DEFAULT_RETRY["retry_on"])), "num_retries": 2, "retriable_status_codes": [503],
           "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}]}
    assert _envoy_retry(old) != _istio_retry(None, hashing=False)
