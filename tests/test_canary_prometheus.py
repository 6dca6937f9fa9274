"""`meshc canary` against a real Prometheus scraping a real Envoy.

Three services each run a canary v2 with the same schedule and analysis. A
real Envoy routes them by meshc's compiled snapshot to real backends; the
`x-canary: on` header sends a request to v2. Prometheus (Debian's package)
scrapes Envoy's /stats/prometheus every second. Then `meshc canary --commit`
runs once per service: the healthy canary steps, the one whose v2 answers 500
to every tenth request is rolled back with the reason in its commit, and the
one that got no traffic holds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pygit2
import pytest
import requests
import yaml

from compiler.cli import main
from compiler.load import source_from_dir
from compiler.pipeline import compile_source
from compiler.xds import sample
from envoy_static import file_bootstrap
from support.backends import Backend, free_port, unique_loopback
from support.envoy import Envoy
from test_gitops_support import make_repo

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="no prometheus: install Debian's prometheus (`make test` does it when run as root with apt)")

SERVICES = ("ok", "bad", "quiet")


def _policy(name: str) -> str:
    return f"""\
apiVersion: meshc.dev/v1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
  versions: {{v1: {{labels: {{version: v1}}}}, v2: {{labels: {{version: v2}}}}}}
  traffic:
    stable: v1
    canary:
      version: v2
      weight: 10
      match: {{headers: {{x-canary: {{exact: "on"}}}}}}
      steps: [10, 25, 50, 100]
      analysis:
        successRate: {{min: 99.0}}
        latencyP99: {{max: 500ms}}
        interval: 1m
        minRequests: 50
"""


def _environment(address: str, backends: dict) -> str:
    endpoints = "\n".join(f"    shop/{name}: {{v1: [\"{v1.address}\"], v2: [\"{v2.address}\"]}}"
                          for name, (v1, v2) in backends.items())
    return f"""\
# Production, as a person keeps it: meshc canary edits it in place.
apiVersion: meshc.dev/v1
kind: Environment
metadata: {{name: prod}}
spec:
  envoy: {{listenerAddress: {address}}}
  endpoints:
{endpoints}
"""


class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "envoy", "metrics_path": "/stats/prometheus",
                                      "static_configs": [{"targets": [target]}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"], stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200, "ready")

    def value(self, query: str) -> float:
        result = requests.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=5).json()["data"]["result"]
        return sum(float(r["value"][1]) for r in result)

    def wait(self, predicate, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus: {what} within {timeout}s; log:\n{(Path(self.log.name)).read_text()[-2000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


_BAD_5XX = ('envoy_cluster_upstream_rq_xx{cluster_name="outbound|8080|v2|bad.shop.svc.cluster.local",'
            'envoy_response_code_class="5"}')


def _requests_to(prometheus: Prometheus, name: str, series: str = "_xx") -> float:
    return prometheus.value(f'envoy_cluster_upstream_rq{series}{{cluster_name="outbound|8080|v2|{name}.shop.svc.cluster.local"}}')


def test_a_healthy_canary_steps_a_failing_one_rolls_back_and_a_quiet_one_holds(tmp_path):
    backends = {"ok": (Backend("ok-v1"), Backend("ok-v2")), "bad": (Backend("bad-v1"), Backend("bad-v2", fail_every=10)),
                "quiet": (Backend("quiet-v1"), Backend("quiet-v2"))}
    for pair in backends.values():
        for backend in pair:
            backend.start()
    address = unique_loopback()
    repo = make_repo(tmp_path / "repo", {**{f"policies/shop/{n}.yaml": _policy(n) for n in SERVICES},
                                         "environments/prod.yaml": _environment(address, backends)})
    result = compile_source(source_from_dir(Path(repo.workdir)))
    assert result.ok, [d.render() for d in result.diagnostics]
    files = {p.removeprefix("envoy/").removesuffix(".json"): __import__("json").loads(data)
             for p, data in result.outputs["prod"].items() if p.startswith("envoy/")}
    # Histograms reach /stats/prometheus at each stats flush: every second here (5 s by default).
    bootstrap = {**file_bootstrap(files, tmp_path / "envoy"), "stats_config": sample.STATS_CONFIG, "stats_flush_interval": "1s"}
    prometheus = None
    try:
        with Envoy(bootstrap, tmp_path / "envoy") as proxy:
            proxy.wait_until(lambda: proxy.listeners().get("listener_statuses"), message="listeners up")
            listener = proxy.listener_address(f"{address}_8080")
            admin = proxy.admin_url.removeprefix("http://")
            prometheus = Prometheus(tmp_path / "prometheus", admin)

            def send(name: str, n: int) -> None:
                with requests.Session() as session:
                    for _ in range(n):
                        session.get(f"http://{listener}/", headers={"host": f"{name}.shop", "x-canary": "on"}, timeout=5)

            # Every series exists, and is scraped, before the traffic that counts: Prometheus' increase()
            # counts a series from its first sample, so a 5xx series born mid-interval loses its first value.
            for name in ("ok", "bad"):
                send(name, 10)  # bad's tenth answer is its first 500
            prometheus.wait(lambda: _requests_to(prometheus, "ok") >= 10 and _requests_to(prometheus, "bad") >= 10
                            and prometheus.value(_BAD_5XX) >= 1, "first samples")
            for name in ("ok", "bad"):
                send(name, 200)
            prometheus.wait(lambda: all(_requests_to(prometheus, n) >= 210 and _requests_to(prometheus, n, "_time_count") >= 210
                                        for n in ("ok", "bad")), "the traffic scraped, latencies too")
            verdicts = {}
            for name in SERVICES:
                code = main(["canary", "--repo", repo.workdir, "--env", "prod", f"shop/{name}",
                             "--prometheus", prometheus.url, "--commit"])
                head = repo.head.peel(pygit2.Commit)
                verdicts[name] = (code, head.message if head.message.startswith("meshc canary") else None)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for pair in backends.values():
            for backend in pair:
                backend.stop()
    ok_code, ok_commit = verdicts["ok"]
    assert ok_code == 0 and ok_commit.startswith("meshc canary: prod · shop/ok: step 10% → 25% (success 100.0% ≥ 99%"), ok_commit
    bad_code, bad_commit = verdicts["bad"]
    assert bad_code == 1 and "prod · shop/bad: roll back 10% → 0% (success " in bad_commit and "% < 99%" in bad_commit, bad_commit
    quiet_code, _ = verdicts["quiet"]
    assert quiet_code == 0
    log = [c.message.splitlines()[0] for c in repo.walk(repo.head.target)]
    assert len([m for m in log if m.startswith("meshc canary")]) == 2  # the hold committed nothing
    text = (Path(repo.workdir) / "environments/prod.yaml").read_text()
    assert text.startswith("# Production, as a person keeps it")
    effective = compile_source(source_from_dir(Path(repo.workdir))).meshes["prod"]
    assert effective.service("shop/ok").traffic.canary.weight == 25
    assert effective.service("shop/bad").traffic.canary.weight == 0
    assert effective.service("shop/bad").traffic.plan.halted.startswith("success ")
    assert effective.service("shop/quiet").traffic.canary.weight == 10
