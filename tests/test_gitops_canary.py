"""`meshc canary`: decisions from Prometheus figures, written into git as the one line they change.

Prometheus here is `FakePrometheus`, a small HTTP server on 127.0.0.1 that
answers the HTTP API's instant queries with recorded response bodies (the
shapes Prometheus 2.x returns: a vector, an empty vector, NaN, an error). The
real-Prometheus scenario (scraping a real Envoy) is not part of this file.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pygit2
import pytest

from compiler import model as m
from compiler.cli import main
from compiler.gitops.canary import Decision, Figures, Prometheus, PrometheusError, decide, edit, figures, patch_of
from compiler.load import source_from_dir
from compiler.pipeline import compile_source
from test_gitops_support import SAMPLE, commit_files, edit as replace, make_repo

NOW = "2026-12-10T12:00:00Z"


def vector(*values) -> dict:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": {}, "value": [1765368000.0, str(v)]} for v in values]}}


class FakePrometheus:
    """Answers /api/v1/query by the first rule whose text the query contains; records the queries."""

    def __init__(self, rules: list[tuple[str, dict]], status: int = 200) -> None:
        self.rules, self.status, self.queries = rules, status, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                query = parse_qs(urlsplit(self.path).query).get("query", [""])[0]
                fake.queries.append(query)
                body = next((b for text, b in fake.rules if text in query), vector())
                data = json.dumps(body).encode()
                self.send_response(fake.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def healthy(requests=4812, errors=10, p99=0.212):
    """Envoy's figures: total, 5xx and the p99 (rq_time is in milliseconds)."""
    return [('envoy_response_code_class="5"', vector(errors)), ("histogram_quantile", vector(p99 * 1000)),
            ("envoy_cluster_upstream_rq_xx", vector(requests))]


PLAN = m.CanaryPlan(steps=(10, 25, 50, 100), success_min=99.0, latency_p99_max_ms=500, interval_ms=300_000, min_requests=100)


# --- the client, over recorded answers --------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    (vector(12, 30), 42.0),            # several series: summed
    (vector(), None),                  # an empty vector: no data, not zero
    (vector("NaN"), None),             # a rate over nothing
    (vector(5, "NaN"), 5.0),
])
def test_a_query_reads_a_vector(body, expected):
    prom = FakePrometheus([("", body)])
    try:
        assert Prometheus(prom.url).scalar("up") == expected
    finally:
        prom.close()


def test_an_error_answer_or_no_server_is_a_prometheus_error():
    prom = FakePrometheus([("", {"status": "error", "errorType": "bad_data", "error": "parse error"})], status=400)
    try:
        with pytest.raises(PrometheusError, match="answered 400: parse error"):
            Prometheus(prom.url).scalar("up{")
    finally:
        prom.close()
    with pytest.raises(PrometheusError, match="cannot be asked"):
        Prometheus(prom.url, timeout=1).scalar("up")


def test_figures_come_from_envoys_cluster_statistics_by_meshcs_cluster_name():
    svc = compile_source(source_from_dir_files(SAMPLE), envs=["prod"]).meshes["prod"].service("bookinfo/reviews")
    prom = FakePrometheus(healthy())
    try:
        found = figures(Prometheus(prom.url), "envoy", svc, 300_000)
    finally:
        prom.close()
    assert found == Figures(4812, pytest.approx(100 * (1 - 10 / 4812)), pytest.approx(212))
    assert all('cluster_name="outbound|9080|v2|reviews.bookinfo.svc.cluster.local"' in q for q in prom.queries)
    assert all("[300s]" in q for q in prom.queries)


def test_a_counter_reset_cannot_make_success_negative():
    """Across a counter reset, increase() extrapolates each series on its own and can read more
    5xx than requests: the success rate is floored at 0, not negative."""
    svc = compile_source(source_from_dir_files(SAMPLE), envs=["prod"]).meshes["prod"].service("bookinfo/reviews")
    prom = FakePrometheus(healthy(requests=100, errors=120))
    try:
        found = figures(Prometheus(prom.url), "envoy", svc, 300_000)
    finally:
        prom.close()
    assert found.success == 0.0 and decide(PLAN, 10, found).action == "rollback"


# --- decisions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weight, found, hold, expected", [
    (10, Figures(4812, 99.8, 212), None, ("step", 25)),
    (50, Figures(4812, 99.8, 212), None, ("promote", 100)),           # the next step is 100
    (10, Figures(4812, 97.0, 212), None, ("rollback", 0)),
    (10, Figures(4812, 99.8, 900), None, ("rollback", 0)),
    (10, Figures(40, 50.0, 900), None, ("hold", None)),               # too few requests: never a rollback
    (10, None, "Prometheus unreachable", ("hold", None)),
    (10, Figures(4812, 99.8, 212), "freeze window", ("hold", None)),
])
def test_decisions(weight, found, hold, expected):
    decision = decide(PLAN, weight, found, hold)
    assert (decision.action, decision.weight) == expected, decision


def test_a_halted_canary_is_left_alone():
    halted = m.CanaryPlan(steps=(10, 25), success_min=99.0, halted="success 97.0% < 99%")
    assert decide(halted, 0, Figures(5000, 100.0, 10)).action == "hold"


def test_the_verdict_carries_the_figures():
    assert decide(PLAN, 10, Figures(4812, 99.8, 212)).reason == "success 99.8% ≥ 99%, p99 212ms ≤ 500ms, 4,812 requests"


# --- writing it ---------------------------------------------------------------------------------

ENV_TEXT = """\
# Production. Hand-written: its comments must outlive every run.
apiVersion: meshc.dev/v1
kind: Environment
metadata: {name: prod}
spec:
  defaults: {timeout: 10s}   # the mesh-wide default
  overrides:
    bookinfo/reviews:
      traffic: {canary: {weight: 10}}   # moved by meshc canary
    bookinfo/details:
      timeout: 2s
"""


def test_a_step_changes_the_one_value_and_nothing_else():
    after = edit(ENV_TEXT, "bookinfo/reviews", patch_of(Decision("step", 25, ""), "v2"))
    assert after == ENV_TEXT.replace("{weight: 10}", "{weight: 25}")


def test_a_rollback_and_a_promotion_rewrite_only_their_service_entry():
    rolled = edit(ENV_TEXT, "bookinfo/reviews", patch_of(Decision("rollback", 0, "p99 900ms > 500ms"), "v2"))
    assert rolled.splitlines()[:7] == ENV_TEXT.splitlines()[:7] and rolled.splitlines()[-2:] == ENV_TEXT.splitlines()[-2:]
    assert '    bookinfo/reviews: {traffic: {canary: {weight: 0, halted: "p99 900ms > 500ms"}}}' in rolled
    promoted = edit(ENV_TEXT, "bookinfo/ratings", patch_of(Decision("promote", 100, ""), "v2"))
    assert promoted == ENV_TEXT.replace("  overrides:\n", "  overrides:\n    bookinfo/ratings: {traffic: {stable: v2, canary: null}}\n")


def test_an_environment_without_overrides_gets_them():
    text = "apiVersion: meshc.dev/v1\nkind: Environment\nmetadata: {name: dev}\nspec:\n  defaults: {timeout: 30s}\n"
    after = edit(text, "bookinfo/reviews", patch_of(Decision("step", 25, ""), "v2"))
    assert after == text.replace("spec:\n", "spec:\n  overrides:\n    bookinfo/reviews: {traffic: {canary: {weight: 25}}}\n")


# --- the command on a real git repository ------------------------------------------------------


def source_from_dir_files(files: dict[str, str]):
    from compiler.load import Source

    return Source({p: t.encode() for p, t in files.items() if p.startswith(("policies/", "environments/"))})


SCHEDULED = replace(SAMPLE["policies/bookinfo/reviews.yaml"], "    canary: {version: v2, weight: 10}\n",
                    "    canary:\n      version: v2\n      weight: 10\n      steps: [10, 25, 50, 100]\n"
                    "      analysis: {successRate: {min: 99.0}, latencyP99: {max: 500ms}, interval: 5m, minRequests: 100}\n")


@pytest.fixture
def repo(tmp_path):
    repo = make_repo(tmp_path / "r", {**SAMPLE, "policies/bookinfo/reviews.yaml": SCHEDULED})
    return repo


def meshc(*argv: str) -> int:
    return main(list(argv))


def test_a_healthy_canary_steps_in_one_commit_that_says_why(repo, capsys):
    prom = FakePrometheus(healthy())
    try:
        code = meshc("canary", "--repo", repo.workdir, "--env", "prod", "--prometheus", prom.url, "--commit", "--now", NOW)
    finally:
        prom.close()
    out = capsys.readouterr().out
    assert code == 0
    line = "prod · bookinfo/reviews: step 5% → 10% (success 99.8% ≥ 99%, p99 212ms ≤ 500ms, 4,812 requests)"
    assert line in out
    head = repo.head.peel(pygit2.Commit)
    assert head.message == f"meshc canary: {line}\n\n{line}\n"
    diff = repo.diff(head.parents[0], head)
    assert [p.delta.new_file.path for p in diff] == ["environments/prod.yaml"]
    assert diff.stats.insertions == 1 and diff.stats.deletions == 1


def test_a_failing_canary_is_rolled_back_with_its_reason_and_exits_1(repo, capsys):
    prom = FakePrometheus(healthy(errors=481))
    try:
        code = meshc("canary", "--repo", repo.workdir, "--env", "prod", "--prometheus", prom.url, "--commit", "--now", NOW)
    finally:
        prom.close()
    assert code == 1
    text = (Path(repo.workdir) / "environments/prod.yaml").read_text()
    assert 'halted: "success 90.0% < 99%' in text and "weight: 0" in text
    assert "roll back 5% → 0%" in repo.head.peel(pygit2.Commit).message
    result = compile_source(source_from_dir(Path(repo.workdir)), envs=["prod"])
    assert result.ok and result.meshes["prod"].service("bookinfo/reviews").traffic.canary.weight == 0


def test_quiet_traffic_holds_and_so_does_a_freeze_window(repo, capsys):
    before = (Path(repo.workdir) / "environments/prod.yaml").read_text()
    prom = FakePrometheus(healthy(requests=12, errors=3))
    try:
        assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "--prometheus", prom.url, "--commit", "--now", NOW) == 0
    finally:
        prom.close()
    assert "hold at 5% (12 requests < 100)" in capsys.readouterr().out
    commit_files(repo, {"environments/prod.yaml": before + "  freeze:\n    - from: 2026-12-10T00:00:00Z\n"
                                                          "      to: 2026-12-11T00:00:00Z\n"}, "a freeze")
    frozen_text = (Path(repo.workdir) / "environments/prod.yaml").read_text()
    head = repo.head.target
    assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "--prometheus", "http://127.0.0.1:9", "--commit",
                 "--now", NOW) == 0
    assert "hold at 5% (freeze window 2026-12-10T00:00:00Z → 2026-12-11T00:00:00Z)" in capsys.readouterr().out
    assert (Path(repo.workdir) / "environments/prod.yaml").read_text() == frozen_text and repo.head.target == head


def test_prometheus_unreachable_holds_and_never_rolls_back(repo, capsys):
    assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "--prometheus", "http://127.0.0.1:9",
                 "--dry-run", "--now", NOW) == 0
    assert "hold at 5% (Prometheus at http://127.0.0.1:9 cannot be asked" in capsys.readouterr().out


def test_usage_errors_exit_2(repo, capsys):
    assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "--now", "tomorrow") == 2
    assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "--now", NOW) == 2  # no Prometheus named
    assert "names no Prometheus" in capsys.readouterr().err
    assert meshc("canary", "--repo", repo.workdir, "--env", "prod", "shop/none", "--now", NOW) == 2


# --- meshc promote ------------------------------------------------------------------------------

RELEASED = replace(SCHEDULED, "    v2: {labels: {version: v2}}\n", "    v2: {labels: {version: v2}}\n    v3: {labels: {version: v3}}\n")
STAGING_ON_V3 = "  overrides:\n    bookinfo/reviews: {traffic: {stable: v3, canary: null}}\n"


@pytest.fixture
def released(tmp_path):
    from test_gitops_support import environment

    return make_repo(tmp_path / "r", {**SAMPLE, "policies/bookinfo/reviews.yaml": RELEASED,
                                      "environments/staging.yaml": environment("staging", STAGING_ON_V3)})


def test_a_release_reaches_prod_as_a_canary_at_its_first_step(released, capsys):
    assert meshc("promote", "--repo", released.workdir, "--from", "staging", "--to", "prod", "bookinfo/reviews",
                 "--commit", "--now", NOW) == 0
    line = "prod · bookinfo/reviews: canary v3 at 10% (from staging; step 1 of 4)"
    assert line in capsys.readouterr().out
    head = released.head.peel(pygit2.Commit)
    assert head.message == f"meshc promote: {line}\n\n{line}\n"
    prod = compile_source(source_from_dir(Path(released.workdir)), envs=["prod"]).meshes["prod"].service("bookinfo/reviews")
    assert (prod.traffic.stable, prod.traffic.canary.version, prod.traffic.canary.weight) == ("v1", "v3", 10)
    from compiler.gitops.review import diff_revisions

    lines = [str(x) for x in diff_revisions(released.workdir, "HEAD~1", "HEAD").summary]
    assert "prod · bookinfo/reviews: canary v2 → v3 at 10%, step 1 of 4" in lines, lines


def test_promotion_refuses_a_freeze_window_and_a_jump_to_all_of_prod(released, capsys):
    from test_gitops_support import environment

    frozen_prod = environment("prod", "  freeze:\n    - from: 2026-12-10T00:00:00Z\n      to: 2026-12-11T00:00:00Z\n")
    commit_files(released, {"environments/prod.yaml": frozen_prod}, "freeze prod")
    head = released.head.target
    assert meshc("promote", "--repo", released.workdir, "--from", "staging", "--to", "prod", "bookinfo/reviews",
                 "--commit", "--now", NOW) == 1
    assert "prod is frozen (2026-12-10T00:00:00Z → 2026-12-11T00:00:00Z)" in capsys.readouterr().err
    assert released.head.target == head
    unscheduled = replace(RELEASED, "      steps: [10, 25, 50, 100]\n", "")
    unscheduled = replace(unscheduled, "      analysis: {successRate: {min: 99.0}, latencyP99: {max: 500ms}, interval: 5m, minRequests: 100}\n", "")
    commit_files(released, {"policies/bookinfo/reviews.yaml": unscheduled,
                            "environments/prod.yaml": environment("prod")}, "no schedule")
    assert meshc("promote", "--repo", released.workdir, "--from", "staging", "--to", "prod", "bookinfo/reviews", "--now", NOW) == 1
    assert "would send it all of prod's traffic at once" in capsys.readouterr().err
    assert meshc("promote", "--repo", released.workdir, "--from", "staging", "--to", "dev", "bookinfo/reviews", "--now", NOW) == 0
    assert "dev · bookinfo/reviews: stable v1 → v3 (from staging; no schedule)" in capsys.readouterr().out


def test_each_decision_is_its_own_commit(tmp_path, capsys):
    second = replace(replace(SCHEDULED, "name: reviews", "name: cart"), "app: reviews", "app: cart")
    repo = make_repo(tmp_path / "r", {**SAMPLE, "policies/bookinfo/reviews.yaml": SCHEDULED, "policies/bookinfo/cart.yaml": second})
    start = repo.head.target
    prom = FakePrometheus(healthy())
    try:
        assert meshc("canary", "--repo", repo.workdir, "--env", "staging", "--prometheus", prom.url, "--commit", "--now", NOW) == 0
    finally:
        prom.close()
    commits = [c for c in repo.walk(repo.head.target) if c.id != start][:2]
    assert [c.message.splitlines()[0] for c in reversed(commits)] == [
        "meshc canary: staging · bookinfo/cart: step 10% → 25% (success 99.8% ≥ 99%, p99 212ms ≤ 500ms, 4,812 requests)",
        "meshc canary: staging · bookinfo/reviews: step 10% → 25% (success 99.8% ≥ 99%, p99 212ms ≤ 500ms, 4,812 requests)"]
    assert commits[1].parents[0].id == start and all(repo.diff(c.parents[0], c).stats.files_changed == 1 for c in commits)


def test_istio_figures_come_from_its_standard_request_metrics():
    svc = compile_source(source_from_dir_files(SAMPLE), envs=["prod"]).meshes["prod"].service("bookinfo/reviews")
    prom = FakePrometheus([('response_code=~"5.."', vector(5)), ("histogram_quantile", vector(120)),
                           ("istio_requests_total", vector(1000))])
    try:
        found = figures(Prometheus(prom.url), "istio", svc, 60_000)
    finally:
        prom.close()
    assert found == Figures(1000, 99.5, 120)
    selector = 'destination_service="reviews.bookinfo.svc.cluster.local",destination_version="v2"'
    assert all(selector in q and "[60s]" in q for q in prom.queries)
    assert any("istio_request_duration_milliseconds_bucket" in q for q in prom.queries)
