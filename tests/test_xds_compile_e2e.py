"""The whole loop: edit a canary weight, `meshc compile`, and a real Envoy fed by
`meshc serve` shifts its traffic within a second, with no restart and no error.

Uses the example policies and the `dev` environment (loopback endpoints, plain
text), moved onto loopback addresses unique to this test.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from compiler.xds import sample
from compiler.xds.server import Options, ServerThread
from support.backends import Backend, free_port, unique_loopback
from support.envoy import Envoy, count_responses

ROOT = Path(__file__).resolve().parents[1]
MESHC = Path(sys.executable).parent / "meshc"
HOST = {"host": "reviews.bookinfo.svc.cluster.local"}
N = 400

pytestmark = pytest.mark.skipif(not (ROOT / "environments" / "dev.yaml").is_file()
                                or not MESHC.exists(), reason="needs the example repo and meshc")


def _near(count: int, n: int, percent: int) -> bool:
    p = percent / 100
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def _set_weight(env_file: Path, weight: int) -> None:
    doc = yaml.safe_load(env_file.read_text())
    doc["spec"]["overrides"]["bookinfo/reviews"]["traffic"] = {"canary": {"weight": weight}}
    env_file.write_text(yaml.safe_dump(doc, sort_keys=False))


def _compile(repo: Path) -> None:
    result = subprocess.run([str(MESHC), "compile", "--repo", str(repo)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _route_version(envoy: Envoy) -> str:
    dump = envoy.config_dump(resource="dynamic_route_configs")
    return {c["route_config"]["name"]: c.get("version_info", "")
            for c in dump.get("configs", [])}.get("9080", "")


def test_canary_weight_change_reaches_envoy_within_a_second(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "policies", repo / "policies")
    (repo / "environments").mkdir()
    env_file = repo / "environments" / "dev.yaml"
    doc = yaml.safe_load((ROOT / "environments" / "dev.yaml").read_text())
    listen = unique_loopback()
    others = unique_loopback()
    with Backend("v1", host=unique_loopback()) as v1, Backend("v2", host=unique_loopback()) as v2, \
            Backend("v3", host=unique_loopback()) as v3:
        endpoints = {key: [f"{others}:{free_port(others)}"] if isinstance(value, list)
                     else {v: [f"{others}:{free_port(others)}"] for v in value}
                     for key, value in doc["spec"]["endpoints"].items()}
        endpoints["bookinfo/reviews"] = {b.name: [b.address] for b in (v1, v2, v3)}
        doc["spec"]["endpoints"] = endpoints
        doc["spec"]["envoy"]["listenerAddress"] = listen
        env_file.write_text(yaml.safe_dump(doc, sort_keys=False))
        _set_weight(env_file, 20)
        _compile(repo)

        options = Options(rendered=repo / "rendered", grpc_port=0, http_port=0)
        with ServerThread(options) as server:
            bootstrap = sample.ads_bootstrap("sidecar", "dev", ("127.0.0.1", server.server.grpc_port))
            with Envoy(bootstrap, tmp_path / "envoy") as envoy:
                url = f"http://{listen}:9080/"
                envoy.wait_until(lambda: count_responses(url, 5, HOST)["v1"], timeout=10,
                                 message="traffic reaches reviews")
                split = count_responses(url, N, HOST)
                assert set(split) <= {"v1", "v2"} and _near(split["v2"], N, 20), split
                assert count_responses(url, 20, {**HOST, "x-canary": "on"}) == Counter(v2=20)

                before = _route_version(envoy)
                errors: list[Exception] = []
                seen: Counter = Counter()
                stop = threading.Event()

                def traffic() -> None:
                    while not stop.is_set():
                        try:
                            seen.update(count_responses(url, 20, HOST))
                        except Exception as exc:        # noqa: BLE001 - asserted below
                            errors.append(exc)

                worker = threading.Thread(target=traffic, daemon=True)
                worker.start()
                _set_weight(env_file, 80)
                _compile(repo)
                compiled = time.monotonic()
                envoy.wait_until(lambda: _route_version(envoy) not in ("", before), timeout=5,
                                 interval=0.02, message="routes follow the compile")
                took = time.monotonic() - compiled
                stop.set()
                worker.join(10)
                assert took < 1.0, took
                assert not errors and set(seen) <= {"v1", "v2"}, (errors, seen)
                split = count_responses(url, N, HOST)
                assert _near(split["v2"], N, 80), split
                assert envoy.stat("listener_manager.listener_create_success") >= 1
