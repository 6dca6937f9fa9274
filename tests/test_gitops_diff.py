"""`meshc diff`: both revisions compiled from git objects, summarised in traffic terms."""

from __future__ import annotations

import json

import pytest

from compiler.cli import main
from compiler.gitops.diff import EnvDiff, Line, Report
from compiler.gitops.render import MARKER, markdown
from compiler.gitops.resources import Change, FieldChange, ResourceChange, field_changes
from compiler.gitops.review import diff_revisions
from test_gitops_support import (DETAILS, PROD_OVERRIDES, RATINGS, REVIEWS, SAMPLE, commit_files, edit, environment,
                                 make_repo)

REVIEWS_25 = edit(REVIEWS, "weight: 10", "weight: 25")


def meshc(*argv: str) -> int:
    """`meshc ARGS...` in this process: the real entry point."""
    return main(list(argv))


@pytest.fixture
def repo(tmp_path):
    return make_repo(tmp_path / "r")


def write(repo, path: str, text: str) -> None:
    (__import__("pathlib").Path(repo.workdir) / path).write_text(text)


def test_a_canary_edit_reads_as_one_line_per_change(repo, capsys):
    """The issue's 'done when': edit a weight on a branch, `meshc diff --base main`."""
    write(repo, "policies/bookinfo/reviews.yaml", REVIEWS_25)

    assert meshc("diff", "--repo", repo.workdir, "--base", "main") == 0

    out = capsys.readouterr().out
    assert "dev, staging · bookinfo/reviews: canary v2 10% → 25%" in out
    assert "prod" not in out.split("Warnings:")[0].split("\n\n")[1]  # prod pins the weight at 5 ...
    assert ("prod · bookinfo/reviews: the change to policies/bookinfo/reviews.yaml has no effect here "
            "(an override in environments/prod.yaml pins it)") in out  # ... and the reviewer is told
    assert "~ spec.http[default].route[v2].weight: 10 → 25" in out
    assert "prod: no change" in out


def test_summary_names_services_timeouts_and_versions(repo):
    commit_files(repo, {"policies/bookinfo/ratings.yaml": edit(RATINGS, "timeout: 2s", "timeout: 1s"),
                        "policies/bookinfo/details.yaml": edit(edit(DETAILS, "    v1: {labels: {version: v1}}\n", ""),
                                                               "{split: {v1: 50, v2: 50}}", "{stable: v2}"),
                        "policies/shop/cart.yaml": edit(edit(RATINGS, "ratings", "cart"), "bookinfo", "shop")},
                 "several changes")

    report = diff_revisions(repo.workdir, "HEAD~1", "HEAD")

    lines = [str(line) for line in report.summary]
    assert "dev, prod, staging · bookinfo/ratings: timeout 2s → 1s" in lines
    assert "dev, prod, staging · bookinfo/details: version v1 removed" in lines
    assert "dev, prod, staging · bookinfo/details: traffic split v1 50% / v2 50% → stable v2" in lines
    assert "dev, prod, staging · shop/cart: new service" in lines
    codes = {w.code for w in report.warnings}
    assert codes == {"timeout-shortened", "canary-step"}
    prod = next(e for e in report.environments if e.name == "prod")
    assert ResourceChange("Service shop/cart", "istio/shop/cart.yaml", Change.ADDED) in prod.istio
    assert any(r.key.startswith("cluster outbound|9080|v1|details") and r.change is Change.REMOVED for r in prod.envoy)


def test_canary_step_limit_is_25_points(repo):
    write(repo, "policies/bookinfo/reviews.yaml", edit(REVIEWS, "weight: 10", "weight: 35"))
    assert not [w for w in diff_revisions(repo.workdir, "main").warnings if w.code == "canary-step"]
    write(repo, "policies/bookinfo/reviews.yaml", edit(REVIEWS, "weight: 10", "weight: 36"))
    steps = [w for w in diff_revisions(repo.workdir, "main").warnings if w.code == "canary-step"]
    assert [str(w) for w in steps] == [
        "dev, staging · bookinfo/reviews: canary v2 10% → 36% moves 26 points of traffic in one step (more than 25)"]


def test_removing_a_version_a_patch_still_routes_to_is_flagged(repo):
    patch = """\
  patches:
    - target: {kind: VirtualService, namespace: bookinfo, name: details}
      ops: [{op: add, path: /spec/http/0/mirror, value: {host: details.bookinfo.svc.cluster.local, subset: v1}}]
"""
    commit_files(repo, {"environments/staging.yaml": environment("staging", patch)}, "mirror details to v1")
    write(repo, "policies/bookinfo/details.yaml",
          edit(edit(DETAILS, "    v1: {labels: {version: v1}}\n", ""), "{split: {v1: 50, v2: 50}}", "{stable: v2}"))

    report = diff_revisions(repo.workdir, "main")

    referenced = [w for w in report.warnings if w.code == "version-referenced"]
    assert [w.envs for w in referenced] == [("staging",)]
    assert "version v1 is removed but still referenced in istio/bookinfo/details.yaml" in referenced[0].text


def test_an_environment_edit_that_renders_nothing_new_is_flagged(repo):
    write(repo, "environments/dev.yaml", SAMPLE["environments/dev.yaml"] + "  # tuned later\n")
    report = diff_revisions(repo.workdir, "main")
    assert not report.changed
    assert [str(w) for w in report.warnings] == ["dev: environments/dev.yaml changed but rendered/dev does not"]


def test_a_pinning_override_in_a_yml_environment_file_is_named(tmp_path):
    """`.yml` is an environment file too (compiler.load): the hint names the file that pins."""
    files = {p: t for p, t in SAMPLE.items() if p != "environments/prod.yaml"}
    repo = make_repo(tmp_path / "r", files | {"environments/prod.yml": environment("prod", PROD_OVERRIDES)})
    write(repo, "policies/bookinfo/reviews.yaml", REVIEWS_25)
    write(repo, "environments/prod.yml", environment("prod", PROD_OVERRIDES) + "  # tuned later\n")

    warnings = [str(w) for w in diff_revisions(repo.workdir, "main").warnings if w.code == "no-effect"]

    assert warnings == ["prod: environments/prod.yml changed but rendered/prod does not",
                        "prod · bookinfo/reviews: the change to policies/bookinfo/reviews.yaml has no effect here "
                        "(an override in environments/prod.yml pins it)"]


def test_policies_are_read_as_yaml_1_2_like_the_compiler_reads_them(repo):
    """A policy named `on` (YAML 1.1 would read true) is still found behind its override."""
    on = edit(RATINGS, "name: ratings", "name: on")
    commit_files(repo, {"policies/bookinfo/on.yaml": on,
                        "environments/prod.yaml": environment("prod", PROD_OVERRIDES + "    bookinfo/on: {timeout: 3s}\n")},
                 "a service named on")
    write(repo, "policies/bookinfo/on.yaml", edit(on, "timeout: 2s", "timeout: 5s"))

    report = diff_revisions(repo.workdir, "main")

    assert "dev, staging · bookinfo/on: timeout 2s → 5s" in [str(l) for l in report.summary]
    assert [str(w) for w in report.warnings if w.code == "no-effect"] == [
        "prod · bookinfo/on: the change to policies/bookinfo/on.yaml has no effect here "
        "(an override in environments/prod.yaml pins it)"]


def test_envoy_resource_kinds_are_the_files_the_compiler_emits():
    from compiler.gitops.build import render_files
    from compiler.gitops.resources import ENVOY_KINDS

    outputs = render_files({p: t.encode() for p, t in SAMPLE.items() if p.endswith(".yaml")})
    emitted = {rel.removeprefix("envoy/").removesuffix(".json") for files in outputs.values()
               for rel in files if rel.startswith("envoy/")}
    assert set(ENVOY_KINDS) == emitted  # every kind named, and no name for a file never written


def test_the_cache_is_saved_by_closing_it_once(repo, monkeypatch):
    """Closing the cache saves it; neither the pipeline nor the GitOps commands save on their own."""
    import sys

    from compiler.cache import Cache
    from compiler.gitops.build import open_cache, renderer

    callers, real_save = [], Cache.save

    def save(self):
        callers.append(sys._getframe(1).f_globals["__name__"])
        real_save(self)

    monkeypatch.setattr(Cache, "save", save)
    write(repo, "policies/bookinfo/reviews.yaml", REVIEWS_25)
    diff_revisions(repo.workdir, "main")
    assert callers == ["compiler.cache"], "the diff's cache, saved once, as it closed"
    cache = open_cache(repo.workdir)
    renderer(cache)({p: t.encode() for p, t in SAMPLE.items() if p.endswith(".yaml")})
    renderer(cache)({p: t.encode() for p, t in SAMPLE.items() if p.endswith(".yaml")})
    assert callers == ["compiler.cache"]
    cache.close()
    assert callers == ["compiler.cache"] * 2


def test_new_environment_and_exit_codes(repo, capsys):
    assert meshc("diff", "--repo", repo.workdir, "--base", "main", "--exit-code") == 0
    assert "No environment changes." in capsys.readouterr().out
    write(repo, "environments/qa.yaml", environment("qa"))
    assert meshc("diff", "--repo", repo.workdir, "--base", "main", "--exit-code") == 1
    assert meshc("diff", "--repo", repo.workdir, "--base", "main") == 0
    out = capsys.readouterr().out
    assert "qa: new environment" in out and "qa: environment added" in out


def test_a_side_that_does_not_compile_shows_its_diagnostics(repo, capsys):
    write(repo, "policies/bookinfo/reviews.yaml", edit(REVIEWS, "weight: 10", "weight: 140"))
    assert meshc("diff", "--repo", repo.workdir, "--base", "main", "--format", "markdown") == 2
    out = capsys.readouterr().out
    assert "The head (`working tree`) does not compile" in out
    assert "policies/bookinfo/reviews.yaml:" in out and ": error: " in out
    commit_files(repo, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 140")}, "broken")
    write(repo, "policies/bookinfo/reviews.yaml", REVIEWS)
    assert meshc("diff", "--repo", repo.workdir, "--base", "HEAD", "--format", "json") == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] and doc["errors"]["base"] and not doc["errors"]["head"]
    assert doc["errors"]["base"][0]["path"] == "policies/bookinfo/reviews.yaml"


def test_user_mistakes_are_one_line_errors(repo, tmp_path, capsys):
    assert meshc("diff", "--repo", repo.workdir, "--base", "no-such-branch") == 2
    assert capsys.readouterr().err == "meshc: error: unknown revision 'no-such-branch'\n"
    (tmp_path / "plain").mkdir()
    assert meshc("diff", "--repo", str(tmp_path / "plain"), "--base", "main") == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_head_revision_and_a_repo_in_a_subdirectory(tmp_path):
    repo = make_repo(tmp_path / "mono", {f"mesh/{p}": t for p, t in SAMPLE.items()} | {"app/main.go": "package main\n"})
    commit_files(repo, {"mesh/policies/bookinfo/reviews.yaml": REVIEWS_25}, "canary 25")
    report = diff_revisions(tmp_path / "mono" / "mesh", "HEAD~1", "HEAD")
    assert [str(l) for l in report.summary] == ["dev, staging · bookinfo/reviews: canary v2 10% → 25%"]
    assert report.changed_inputs == ("policies/bookinfo/reviews.yaml",)
    assert report.head.startswith("HEAD (")


def test_json_has_the_whole_report(repo, capsys):
    write(repo, "policies/bookinfo/reviews.yaml", REVIEWS_25)
    assert meshc("diff", "--repo", repo.workdir, "--base", "main", "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["changed"] and doc["changedInputs"] == ["policies/bookinfo/reviews.yaml"]
    assert {"environments": ["dev", "staging"], "service": "bookinfo/reviews",
            "text": "canary v2 10% → 25%"} in doc["summary"]
    dev = next(e for e in doc["environments"] if e["name"] == "dev")
    vs = next(r for r in dev["istio"] if r["key"] == "VirtualService bookinfo/reviews")
    assert {"path": "spec.http[default].route[v2].weight", "op": "replace", "old": 10, "new": 25} in vs["fields"]


# --- keyed list items ----------------------------------------------------------------------


def test_list_items_are_named_by_their_key_not_renumbered():
    old = {"spec": {"http": [{"name": "default", "route": [{"destination": {"host": "r", "subset": "v1"}, "weight": 100}]}]}}
    new = {"spec": {"http": [{"name": "canary", "match": [{"headers": {"x": {"exact": "1"}}}],
                              "route": [{"destination": {"host": "r", "subset": "v2"}}]},
                             {"name": "default", "route": [{"destination": {"host": "r", "subset": "v1"}, "weight": 90},
                                                           {"destination": {"host": "r", "subset": "v2"}, "weight": 10}]}]}}
    changes = field_changes(old, new)
    assert FieldChange("spec.http[default].route[v1].weight", "replace", 100, 90) in changes
    assert FieldChange("spec.http[default].route[v2]", "add", None,
                       {"destination": {"host": "r", "subset": "v2"}, "weight": 10}) in changes
    assert any(c.path == "spec.http[canary]" and c.op == "add" for c in changes)
    assert not any(c.op == "reorder" for c in changes)  # an insertion is not a reordering
    swapped = {"spec": {"http": list(reversed(new["spec"]["http"]))}}
    assert field_changes(new, swapped) == [FieldChange("spec.http", "reorder", ["canary", "default"], ["default", "canary"])]
    assert field_changes({"a": [1, 2]}, {"a": [1, 3]}) == [FieldChange("a[1]", "replace", 2, 3)]


# --- markdown size -------------------------------------------------------------------------


def big_report(envs: int, resources: int) -> Report:
    fields = tuple(FieldChange(f"spec.http[default].route[v{i}].weight", "replace", i, i + 1) for i in range(5))
    return Report("main (abc1234)", "working tree",
                  summary=(Line(("prod",), "shop/cart", "canary v2 10% → 25%"),),
                  environments=tuple(EnvDiff(f"env{e:02}", Change.MODIFIED, tuple(
                      ResourceChange(f"VirtualService shop/svc{r:04}", f"istio/shop/svc{r:04}.yaml", Change.MODIFIED, fields)
                      for r in range(resources))) for e in range(envs)))


def test_markdown_fits_a_github_comment_and_says_what_it_left_out():
    report = big_report(envs=6, resources=400)
    doc = markdown(report)
    assert len(doc) < 65_000
    assert doc.startswith(MARKER) and "- **prod** · `shop/cart`: canary v2 10% → 25%" in doc
    assert doc.count("<details>") == doc.count("</details>") >= 1
    assert "**Left out to fit a GitHub comment:**" in doc and "env05 (all 400 resources)" in doc
    small = markdown(big_report(envs=2, resources=3))
    assert "Left out" not in small and small.count("<details>") == 2
    many = Report("a", "b", summary=tuple(Line(("prod",), f"ns/svc{i}", "new service <b>") for i in range(3000)),
                  environments=(EnvDiff("prod", Change.MODIFIED),))
    doc = markdown(many)
    assert len(doc) < 65_000 and "… and 2850 more changes" in doc
    assert "new service &lt;b&gt;" in doc and "<b>" not in doc.replace("<b>prod</b>", "")


REVIEWS_ROUTED = edit(REVIEWS, "  traffic:\n", """\
  routes:
    beta:
      match: {headers: {x-beta: {exact: "1"}}}
      traffic: {split: {v1: 90, v2: 10}}
  traffic:
""")


def test_route_changes_are_named_by_route(repo):
    commit_files(repo, {"policies/bookinfo/reviews.yaml": REVIEWS_ROUTED}, "a beta route")
    write(repo, "environments/prod.yaml", environment("prod", PROD_OVERRIDES.replace(
        "bookinfo/reviews: {traffic: {canary: {weight: 5}}}",
        "bookinfo/reviews:\n      traffic: {canary: {weight: 5}}\n"
        "      routes:\n        beta: {traffic: {split: {v1: 50, v2: 50}}}\n"
        "        old: {match: {path: {prefix: /old}}, redirect: {path: /}}")))
    report = diff_revisions(repo.workdir, "main")
    lines = [str(line) for line in report.summary]
    assert "prod · bookinfo/reviews: route beta split v1 90% → 50%, v2 10% → 50%" in lines, lines
    assert "prod · bookinfo/reviews: route old added (path prefix /old: redirect 301 to path /)" in lines, lines
    assert not [line for line in lines if not line.startswith("prod · ")]


def test_a_fault_new_in_prod_is_a_warning_and_elsewhere_is_not(repo):
    fault = "      fault: {abort: {status: 503, percent: 1}}\n"
    for name, extra in (("staging", "  overrides:\n    bookinfo/ratings:\n" + fault),
                        ("prod", PROD_OVERRIDES + "    bookinfo/ratings:\n" + fault)):
        write(repo, f"environments/{name}.yaml", environment(name, extra))
    report = diff_revisions(repo.workdir, "main")
    faults = [str(w) for w in report.warnings if w.code == "fault-in-prod"]
    assert faults == ["prod · bookinfo/ratings: the service now injects a fault in prod (abort 503 1%): "
                      "real users get the delays and errors"], faults
    assert [str(line) for line in report.summary] == ["prod, staging · bookinfo/ratings: fault none → abort 503 1%"]


def test_a_shadowed_route_fails_the_head_at_the_route(repo):
    write(repo, "policies/bookinfo/reviews.yaml", edit(REVIEWS_ROUTED, "  traffic:\n", """\
    api:
      match: {path: {prefix: /api}}
    api-v2:
      match: {path: {prefix: /api/v2}}
  traffic:
""", ))
    report = diff_revisions(repo.workdir, "main")
    assert report.failed and not report.base_errors
    [error] = report.head_errors
    assert error.code == "routes.shadowed" and error.span.path == "policies/bookinfo/reviews.yaml"
    assert "no-effect" not in {w.code for w in report.warnings}
