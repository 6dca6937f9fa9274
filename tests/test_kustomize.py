"""`kubectl kustomize rendered/<env>` builds, and yields exactly the listed files' documents.

That is what Argo CD and Flux do with the directory: they never see `envoy/`,
and every Service, DestinationRule, VirtualService and Gateway arrives
exactly once and unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from conftest import GOLDEN, REPO
from golden import run_cli

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: cannot run `kubectl kustomize`")
CASES = ["examples", "overlays", "ingress-gateway", "tcp-and-multiport"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """case → its freshly compiled rendered/ directory."""
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case)
        source = REPO if case == "examples" else GOLDEN / case
        for part in ("policies", "environments"):
            shutil.copytree(source / part, root / part)
        code, stderr = run_cli(["compile", "--repo", str(root)])
        assert code == 0, stderr
        out[case] = root / "rendered"
    return out


@lru_cache(maxsize=None)
def kustomize(directory: Path) -> list[dict]:
    """The documents `kubectl kustomize` builds from `directory` (once per directory)."""
    proc = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def identity(doc: dict) -> tuple[str, str, str, str]:
    return doc["apiVersion"], doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]


def env_dirs(rendered: dict[str, Path]) -> list[tuple[str, Path]]:
    return [(f"{case}/{d.name}", d) for case, root in sorted(rendered.items()) for d in sorted(root.iterdir())]


def test_every_environment_builds_to_exactly_its_listed_files(rendered):
    dirs = env_dirs(rendered)
    assert [name for name, _ in dirs if name.startswith("examples/")] == ["examples/dev", "examples/prod", "examples/staging"]
    for name, env_dir in dirs:
        listed = yaml.safe_load((env_dir / "kustomization.yaml").read_text())["resources"]
        on_disk = sorted(p.relative_to(env_dir).as_posix() for p in env_dir.rglob("*.yaml") if p.name != "kustomization.yaml")
        assert listed == on_disk, name  # every Istio file listed, nothing else
        expected = [d for path in listed for d in yaml.safe_load_all((env_dir / path).read_text())]

        built = kustomize(env_dir)

        assert Counter(identity(d) for d in built) == Counter(identity(d) for d in expected), name
        assert sorted(map(repr, built)) == sorted(map(repr, expected)), f"{name}: kustomize changed a document"


def test_envoy_files_stay_out_of_the_build(rendered):
    for name, env_dir in env_dirs(rendered):
        assert sorted(p.name for p in (env_dir / "envoy").iterdir()) in (
            ["clusters.json", "endpoints.json", "listeners.json", "routes.json"],
            ["clusters.json", "endpoints.json", "listeners.json", "routes.json", "scopes.json"])  # where a service has egress
        kinds = Counter(d["kind"] for d in kustomize(env_dir))
        assert set(kinds) <= {"Service", "DestinationRule", "VirtualService", "Gateway", "ServiceEntry", "Sidecar"}, name


def test_the_example_kinds_are_all_there(rendered):
    kinds = Counter(d["kind"] for d in kustomize(rendered["examples"] / "prod"))
    # mongodb is a ServiceEntry in prod (outside the cluster), with its DestinationRule and no
    # VirtualService: four mesh VirtualServices, and productpage's two at the gateway
    # (bookinfo.example.com, shared with ratings by path, and www.bookinfo.example.com, its own);
    # productpage and reviews say what they call: a Sidecar each.
    assert kinds == {"Service": 4, "ServiceEntry": 1, "DestinationRule": 5, "VirtualService": 6, "Gateway": 1, "Sidecar": 2}
