"""deploy/kubernetes/: the manifests hang together, and with what `meshc serve` does."""

from __future__ import annotations

import json

import jsonschema
import yaml

from compiler.xds.cli import add_parser
from conftest import REPO, SCHEMAS

MANIFEST = REPO / "deploy" / "kubernetes" / "meshc-serve.yaml"


def _objects() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def _serve_args(container: dict):
    import argparse

    parser = argparse.ArgumentParser(prog="meshc")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(container["args"])


def test_a_deployment_a_service_and_a_disruption_budget_select_the_same_pods():
    objects = _objects()
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget"}
    deployment = objects["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2 and objects["PodDisruptionBudget"]["spec"]["minAvailable"] == 1


def test_the_service_is_a_valid_kubernetes_service():
    schema = json.loads((SCHEMAS / "k8s-service-v1.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(_objects()["Service"])


def test_serve_reads_what_git_sync_checks_out_and_answers_its_probes_on_its_ports():
    pod = _objects()["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    meshc, sync = containers["meshc"], containers["git-sync"]
    args = _serve_args(meshc)
    sync_args = dict(a.removeprefix("--").split("=", 1) for a in sync["args"])
    assert str(args.rendered) == f"{sync_args['root']}/{sync_args['link']}/rendered"
    assert args.watch == "poll"  # git-sync swaps a symlink: polling sees through it
    mounts = {m["name"]: m["mountPath"] for m in meshc["volumeMounts"]}
    assert mounts["rendered"] == sync_args["root"] and {m["name"]: m["mountPath"] for m in sync["volumeMounts"]}["rendered"] == sync_args["root"]
    ports = {p["name"]: p["containerPort"] for p in meshc["ports"]}
    assert (ports["grpc-xds"], ports["http"]) == (args.grpc[1], args.http[1])
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert meshc[probe]["httpGet"] == {"path": path, "port": "http"}
    assert meshc["resources"]["requests"]["memory"] and meshc["resources"]["requests"]["cpu"]
    service_ports = {p["name"]: p["targetPort"] for p in _objects()["Service"]["spec"]["ports"]}
    assert set(service_ports.values()) == set(ports)


def test_secrets_are_mounted_below_the_secrets_directory_readable_by_the_server_only():
    pod = _objects()["Deployment"]["spec"]["template"]["spec"]
    meshc = next(c for c in pod["containers"] if c["name"] == "meshc")
    args = _serve_args(meshc)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = [m for m in meshc["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert secret_mounts and all(m["mountPath"].startswith(f"{args.secrets}/") for m in secret_mounts)
    assert {f"{args.secrets}/default"} <= {m["mountPath"] for m in secret_mounts}
    assert all(volumes[m["name"]]["secret"]["defaultMode"] & 0o077 == 0 for m in secret_mounts)
    assert str(args.secrets) not in {m["mountPath"] for m in meshc["volumeMounts"]}  # the image's 0700 directory
