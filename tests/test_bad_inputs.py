"""The bad-input corpus (tests/golden/bad-*) through the real command line.

The goldens pin each message and its position; these tests pin the behaviour
around them: every rule of the foundation issue has its case and reports its
diagnostic code, an invalid repo exits 1 without a traceback and leaves the
previous `rendered/` byte-for-byte as it was, a YAML tag never runs code, and
a hostile name never becomes a path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.check import re2_problem
from compiler.diagnostics import Diagnostics
from compiler.load import parse, source_from_dir
from compiler.pipeline import compile_source
from conftest import GOLDEN, REPO
from golden import read_tree, run_cli

BAD = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("bad-"))

# Each rule of issue 2 item 4 (and the extra ones), its golden case and the code it reports.
RULES = [
    ("bad-yaml-syntax", "yaml.syntax"),
    ("bad-yaml-python-tag", "yaml.tag"),
    ("bad-unknown-field", "schema.unknown-field"),
    ("bad-wrong-type", "schema.type"),
    ("bad-missing-field", "external.selector"),  # no selector, and no external host instead
    ("bad-name-path", "schema.format"),
    ("bad-duration-format", "schema.value"),
    ("bad-duration-too-short", "schema.value"),
    ("bad-duration-sub-ms", "schema.value"),
    ("bad-canary-unknown-version", "traffic.unknown-version"),
    ("bad-split-unknown-version", "traffic.unknown-version"),
    ("bad-split-sum", "traffic.split-sum"),
    ("bad-canary-weight", "schema.range"),
    ("bad-duplicate-policy", "policy.duplicate"),
    ("bad-ingress-host-conflict", "ingress.host-conflict"),
    ("bad-ingress-host-conflict-environments", "ingress.host-conflict"),  # once, naming every environment
    ("bad-tcp-port-shared", "ports.tcp-shared"),
    ("bad-override-unknown-key", "overrides.unknown-service"),
    ("bad-override-value", "schema.value"),
    ("bad-override-null-required", "external.selector"),
    ("bad-patch-target", "patch.no-target"),
    ("bad-envoy-patch-target", "patch.no-target"),
    ("bad-envoy-patch-op", "patch.op-failed"),
    ("bad-envoy-patch-invalid", "patch.invalid-resource"),
    ("bad-envoy-patch-inconsistent", "patch.inconsistent"),
    ("bad-envoy-patch-namespace", "patch.namespace"),
    ("bad-patch-op", "patch.op-failed"),
    ("bad-tcp-http-settings", "tcp.http-setting"),
    ("bad-regex-compile", "match.regex"),
    ("bad-regex-re2", "match.regex"),
    ("bad-regex-re2-possessive", "match.regex"),
    ("bad-duplicate-key", "yaml.duplicate-key"),
    ("bad-merge-key", "yaml.merge-key"),
    ("bad-deep-nesting", "yaml.too-deep"),
    ("bad-credential-no-callers", "tls.credential-callers"),
    ("bad-empty-file", "yaml.empty"),
    ("bad-two-documents", "yaml.syntax"),
    ("bad-api-version", "schema.value"),
    ("bad-kind", "schema.value"),
    ("bad-environment-name", "environment.name"),
    ("bad-environment-duplicate", "environment.duplicate"),
    ("bad-duration-too-long", "schema.value"),
    ("bad-endpoints-unknown-version", "endpoints.unknown-version"),
    ("bad-endpoints-list-for-versioned", "endpoints.versions"),
    ("bad-endpoints-address", "schema.value"),
    ("bad-header-control-character", "schema.value"),
    ("bad-split-with-stable", "traffic.shape"),
    ("bad-canary-without-stable", "traffic.shape"),
    ("bad-enum-load-balancer", "schema.value"),
    ("bad-pool-and-balancer-values", "schema.value"),
    ("bad-keepalive-probes", "schema.range"),
    ("bad-policy-unknown-field", "schema.unknown-field"),
    ("bad-policy-http-on-tcp", "tcp.http-setting"),
    ("bad-override-warmup-balancer", "schema.value"),
    ("bad-enum-tls-mode", "schema.value"),
    ("bad-enum-protocol", "schema.value"),
    ("bad-name-starts-with-digit", "schema.format"),
    ("bad-ingress-generated-name", "istio.duplicate-object"),
    ("bad-patch-identity", "patch.op-failed"),
    ("bad-override-split-keeps-stable", "traffic.shape"),
    ("bad-route-two-actions", "schema.value"),
    ("bad-fault-abort-status", "schema.value"),
    ("bad-redirect-no-target", "schema.value"),
    ("bad-tcp-routes", "tcp.http-setting"),
    ("bad-ingress-tls-credential", "schema.missing-field"),
    ("bad-ingress-https-without-tls", "ingress.https-without-tls"),
    ("bad-egress-unknown", "egress.unknown"),
    ("bad-number-not-finite", "yaml.number"),
    ("bad-tls-mutual-without-credential", "schema.value"),
]
# More than one code: each of a case's errors is a different way to miss a target.
MANY_CODES = {
    "bad-mirror-target": {"mirror.unknown-service", "mirror.unknown-version", "mirror.port"},
    "bad-ingress-shared-host": {"ingress.path-regex", "ingress.path-conflict"},
    "bad-ingress-path-conflict": {"ingress.host-conflict", "ingress.serving-conflict"},
    "bad-ingress-tls": {"ingress.redirect-without-tls", "ingress.redirect-port"},
    "bad-ingress-tls-conflict": {"ingress.serving-conflict", "ingress.port-tls"},
    "bad-external": {"external.selector", "external.field", "external.endpoints"},
    "bad-delivery": {"freeze.overlap", "freeze.inverted", "freeze.time"},
    "bad-canary-plan": {"canary.analysis-without-steps", "canary.steps-fall", "canary.interval"},
}
DIAGNOSTIC_LINE = re.compile(r"^(environments|policies)/[^:]+\.ya?ml:\d+:\d+: (error|warning|note): \S.*$")


def test_every_rule_has_a_case_and_every_case_a_rule():
    assert sorted({case for case, _ in RULES} | {"bad-many-errors"} | set(MANY_CODES)) == BAD


@pytest.mark.parametrize("case,codes", [(case, {code}) for case, code in RULES] + sorted(MANY_CODES.items()))
def test_each_case_reports_its_rule_and_only_errors_of_it(case, codes):
    result = compile_source(source_from_dir(GOLDEN / case))
    assert not result.ok and result.outputs == {}
    assert {d.code for d in result.diagnostics if d.is_error} == codes


def copy_case(case: str, dst: Path) -> Path:
    """A private copy of a golden case's input (compiling in place would leave a cache there)."""
    shutil.copytree(GOLDEN / case, dst, ignore=shutil.ignore_patterns("expected*"))
    return dst


def files_under(root: Path) -> list[Path]:
    """Every path below `root` (the re-compile cache lives outside the repo)."""
    return sorted(root.rglob("*"))


@pytest.fixture(scope="module")
def good_rendered(tmp_path_factory) -> Path:
    """The example repo, compiled once: the `rendered/` a bad compile must leave alone."""
    root = tmp_path_factory.mktemp("good")
    shutil.copytree(REPO / "policies", root / "repo/policies")
    shutil.copytree(REPO / "environments", root / "repo/environments")
    assert run_cli(["compile", "--repo", str(root / "repo"), "--out", str(root / "rendered")])[0] == 0
    return root / "rendered"


@pytest.mark.parametrize("case", BAD)
def test_a_bad_case_exits_1_and_leaves_rendered_untouched(case, tmp_path, good_rendered):
    out = tmp_path / "rendered"
    shutil.copytree(good_rendered, out)
    before = read_tree(out)

    code, stderr = run_cli(["compile", "--repo", str(copy_case(case, tmp_path / case)), "--out", str(out)])

    assert code == 1
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("meshc: ")]
    assert lines and all(DIAGNOSTIC_LINE.match(line) for line in lines), stderr
    assert "error: " in stderr
    assert read_tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["dev", "prod", "staging"]  # no staging dirs left behind


def test_breaking_a_compiled_repo_keeps_the_old_rendered_tree(example_repo):
    assert run_cli(["compile", "--repo", str(example_repo)])[0] == 0
    rendered = example_repo / "rendered"
    before = read_tree(rendered)
    reviews = example_repo / "policies/bookinfo/reviews.yaml"
    reviews.write_text(reviews.read_text().replace("weight: 10", "weight: 110"))

    code, stderr = run_cli(["compile", "--repo", str(example_repo)])

    assert code == 1
    assert "policies/bookinfo/reviews.yaml:" in stderr and "is out of range" in stderr
    assert stderr.rstrip().endswith("meshc: 1 error; nothing written")
    assert read_tree(rendered) == before
    assert [p.name for p in rendered.iterdir() if p.name.startswith(".")] == []


def test_the_console_script_prints_no_traceback(tmp_path):
    """The installed `meshc`, in a real process, on the case with errors in every file."""
    meshc = Path(sys.executable).parent / "meshc"
    case = copy_case("bad-many-errors", tmp_path / "case")
    proc = subprocess.run([str(meshc), "compile", "--repo", str(case), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    expected = (GOLDEN / "bad-many-errors" / "expected.txt").read_text().split("\n", 1)[1]
    assert proc.stderr == expected + "meshc: 8 errors; nothing written\n"
    assert not (tmp_path / "out").exists()


# -- YAML tags execute nothing ---------------------------------------------------------------

HOSTILE_TAGS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/name:os.system",
    "!!python/module:os",
    "!custom {{x: 1}}",
    "!!binary aGVsbG8=",
    "!!set {{a, b}}",
]


@pytest.mark.parametrize("tag", HOSTILE_TAGS)
def test_a_yaml_tag_is_refused_and_never_executed(tag, tmp_path):
    marker = tmp_path / "executed"
    text = f"apiVersion: meshc.dev/v1\nkind: TrafficPolicy\nspec:\n  selector: {tag.format(marker=marker)}\n"
    diags = Diagnostics()

    assert parse("policies/x.yaml", text.encode(), diags) is None

    assert [(d.code, d.span.line, d.span.col) for d in diags] == [("yaml.tag", 4, 13)]
    assert not marker.exists()


def test_the_python_tag_case_runs_nothing(tmp_path, monkeypatch):
    # The golden case says `os.system('touch MESHC_PWNED')`: run it where that would land.
    monkeypatch.chdir(tmp_path)
    case = copy_case("bad-yaml-python-tag", tmp_path / "case")
    assert "touch MESHC_PWNED" in (case / "policies/shop/web.yaml").read_text()

    code, stderr = run_cli(["compile", "--repo", str(case), "--out", str(tmp_path / "out")])

    assert code == 1 and "error: YAML tag '!!python/object/apply:os.system' is not allowed" in stderr
    assert list(tmp_path.rglob("MESHC_PWNED")) == [] and not Path("MESHC_PWNED").exists()
    assert not (REPO / "MESHC_PWNED").exists()


# -- names never become paths ----------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("name", "../x"), ("namespace", "../../escape"), ("name", "/abs"),
                                         ("namespace", "a/b"), ("name", ".."), ("name", "web\n")])
def test_a_name_that_is_a_path_is_refused_and_nothing_is_written(field, value, tmp_path):
    repo = copy_case("canary-header-retries", tmp_path / "deep" / "repo")
    policy = repo / "policies/shop/web.yaml"
    old = f"  {field}: {'web' if field == 'name' else 'shop'}\n"
    text = policy.read_text()
    assert old in text
    policy.write_text(text.replace(old, f"  {field}: {value!r}\n".replace("'", '"').replace("\n\"", '\\n"'), 1))
    before = files_under(tmp_path)

    code, stderr = run_cli(["compile", "--repo", str(repo), "--out", str(repo / "rendered")])

    assert code == 1
    label = "DNS-1035" if field == "name" else "DNS-1123"  # a Service name must also start with a letter
    assert f"error: metadata.{field}: " in stderr and f"is not a {label} label" in stderr
    assert files_under(tmp_path) == before  # not in rendered/, not beside it, not above it


def test_an_environment_file_name_is_checked_as_a_name(tmp_path):
    repo = copy_case("canary-header-retries", tmp_path / "repo")
    os.rename(repo / "environments/prod.yaml", repo / "environments/Prod.yaml")
    env = repo / "environments/Prod.yaml"
    env.write_text(env.read_text().replace("name: prod", "name: Prod"))

    code, stderr = run_cli(["compile", "--repo", str(repo), "--out", str(repo / "rendered")])

    assert code == 1 and "environments/Prod.yaml:3:18: error: metadata.name: 'Prod' is not a DNS-1123 label" in stderr
    assert not (repo / "rendered").exists()


# -- regexes Python compiles but Envoy's RE2 refuses -------------------------------------------


@pytest.mark.parametrize("pattern,words", [
    (r"^(?!internal-).*", "RE2 has no look-around"), (r"(?<=a)b", "RE2 has no look-around"),
    (r"(?<!a)b", "RE2 has no look-around"), (r"(a)\1", "RE2 has no back-references"), (r"(?P<x>a)(?P=x)", None),
    (r"(?>ab)c", "RE2 has no atomic groups"), (r"a*+", "RE2 has no possessive quantifiers"),
    (r"[0-9]++", "RE2 has no possessive quantifiers"), (r"a{2,3}+", "RE2 has no possessive quantifiers"),
    (r"(a)?(?(1)b|c)", None), (r"abc\Z", "RE2 spells it \\z"), (r"^(beta", None),
])
def test_re2_refuses_what_python_accepts(pattern, words):
    import re
    if pattern != r"^(beta":
        re.compile(pattern)  # Python's engine takes each of these: only RE2 tells
    problem = re2_problem(pattern)
    assert problem is not None and problem.startswith("is refused by RE2 (Envoy's engine): ")
    assert problem.endswith(f"({words})") if words else not problem.endswith(")")


@pytest.mark.parametrize("pattern", [r"^(qa|dev)-[0-9]+$", r"\++", r"[*+]+", r"[]+]+", r"[^]]+", r"\(?=x", r"\\1",
                                     r"a+?b*?", r"(?i)beta", r"(?P<n>x)+", r"a{2}", r"abc\z"])
def test_re2_takes_what_envoy_takes(pattern):
    assert re2_problem(pattern) is None


def test_a_regex_too_large_for_envoy_is_refused():
    problem = re2_problem("(a|b|c){1,30}x")
    assert problem is not None and "more than the 100 Envoy accepts" in problem
