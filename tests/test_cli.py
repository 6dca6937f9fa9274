"""The command line as DESIGN.md states it: exit codes, --check, --env, pruning, the README loop.

Everything runs through `compiler.cli.main` on private copies of the example
repo, except the last test, which walks the README's workflow in a real git
repository and reads `git diff`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler.cli import main
from golden import read_tree

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def meshc(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process → (exit code, stdout, stderr). argparse's own exits count too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` (the re-compile cache lives outside the repo)."""
    return read_tree(root)


@pytest.fixture
def repo(example_repo: Path) -> Path:
    """The example repo with `rendered/` freshly compiled."""
    shutil.rmtree(example_repo / "rendered", ignore_errors=True)
    code, _, err = meshc("compile", "--repo", str(example_repo))
    assert code == EXIT_OK, err
    return example_repo


# -- exit codes ------------------------------------------------------------------------------


def test_compile_and_validate_succeed_with_0(repo):
    code, out, err = meshc("validate", "--repo", str(repo))
    assert (code, out) == (EXIT_OK, "")
    assert err == "meshc: valid: 5 services × 3 environments (dev, prod, staging)\n"


def test_an_invalid_policy_exits_1(repo):
    details = repo / "policies/bookinfo/details.yaml"
    details.write_text(details.read_text().replace("timeout: 2s", "timeout: 2 s"))
    for command in ("validate", "compile"):
        code, _, err = meshc(command, "--repo", str(repo))
        assert code == EXIT_INVALID
        assert err.startswith("policies/bookinfo/details.yaml:15:12: error: spec.timeout: '2 s' is not a duration")


@pytest.mark.parametrize("argv,message", [
    (["compile", "--env", "qa"], "no environment named qa (environments: dev, prod, staging)"),
    (["validate", "--env", "prod", "--env", "nope"], "no environment named nope"),
    (["compile", "--repo", "{tmp}/missing"], "not a directory"),
    (["validate", "--repo", "{tmp}/empty"], "no environments/*.yaml to compile"),
    (["compile", "--repo"], "expected one argument"),
    (["compile", "--colour"], "unrecognized arguments: --colour"),
    (["compile", "--jobs", "two"], "invalid int value"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_exit_2(example_repo, tmp_path, argv, message):
    repo = example_repo
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv and argv[0] in ("compile", "validate") and "--repo" not in argv:
        argv += ["--repo", str(repo)]
    before = tree(repo)

    code, out, err = meshc(*argv)

    assert code == EXIT_USAGE
    assert message in err and "Traceback" not in err
    assert tree(repo) == before


# -- --check ---------------------------------------------------------------------------------


def check(repo: Path) -> tuple[int, str]:
    code, _, err = meshc("compile", "--repo", str(repo), "--check")
    return code, err


def test_check_passes_on_a_fresh_compile_and_writes_nothing(repo):
    before = tree(repo)
    code, err = check(repo)
    assert code == EXIT_OK and "is current" in err
    assert tree(repo) == before


@pytest.mark.parametrize("change,reason", [
    ("edit", "rendered/prod/istio/bookinfo/reviews.yaml: differs from the compiled output"),
    ("delete", "rendered/prod/istio/bookinfo/reviews.yaml: missing"),
    ("extra", "rendered/prod/istio/bookinfo/extra.yaml: not produced by the compiler (stale)"),
    ("policy", "rendered/prod/istio/bookinfo/reviews.yaml: differs from the compiled output"),
    ("env-dir", "rendered/qa/: no environment file compiles to it (stale)"),
])
def test_check_fails_and_names_the_stale_file(repo, change, reason):
    reviews = repo / "rendered/prod/istio/bookinfo/reviews.yaml"
    if change == "edit":
        reviews.write_text(reviews.read_text().replace("weight: 95", "weight: 94"))
    elif change == "delete":
        reviews.unlink()
    elif change == "extra":
        (reviews.parent / "extra.yaml").write_text("{}\n")
    elif change == "policy":
        policy = repo / "policies/bookinfo/reviews.yaml"
        policy.write_text(policy.read_text().replace("timeout: 4s", "timeout: 5s"))
    else:
        shutil.copytree(repo / "rendered/dev", repo / "rendered/qa")
    before = tree(repo)

    code, err = check(repo)

    assert code == EXIT_INVALID
    assert f"meshc: stale: {reason}\n" in err
    assert "run `meshc compile`" in err
    assert tree(repo) == before
    assert meshc("compile", "--repo", str(repo))[0] == EXIT_OK
    assert check(repo)[0] == EXIT_OK


def test_check_of_one_environment_ignores_the_others(repo):
    (repo / "rendered/dev/istio/bookinfo/reviews.yaml").unlink()
    assert meshc("compile", "--repo", str(repo), "--check", "--env", "prod")[0] == EXIT_OK
    assert meshc("compile", "--repo", str(repo), "--check", "--env", "dev")[0] == EXIT_INVALID


# -- --env, validate, pruning ----------------------------------------------------------------


def test_env_compiles_only_the_named_environments(example_repo, tmp_path):
    out = tmp_path / "out"
    code, _, err = meshc("compile", "--repo", str(example_repo), "--out", str(out), "--env", "prod", "--env", "dev")
    assert code == EXIT_OK and "(dev, prod)" in err
    assert sorted(p.name for p in out.iterdir()) == ["dev", "prod"]
    full = tmp_path / "full"
    assert meshc("compile", "--repo", str(example_repo), "--out", str(full))[0] == EXIT_OK
    assert read_tree(out / "prod") == read_tree(full / "prod")


def test_the_installed_command_exits_fast_and_loses_nothing(example_repo, tmp_path):
    """`meshc compile` ends with os._exit (no teardown): its output, files and cache are all there."""
    import sys

    env = {**__import__("os").environ, "MESHC_CACHE_DIR": str(tmp_path / "cache")}
    shutil.rmtree(example_repo / "rendered")

    def run(*argv):
        done = subprocess.run([sys.executable, "-m", "compiler", *argv, "--repo", str(example_repo)],
                              capture_output=True, text=True, env=env, timeout=120)
        return done.returncode, done.stdout, done.stderr

    code, _, err = run("compile")
    assert code == EXIT_OK and err.endswith("into " + str(example_repo / "rendered") + "\n")
    assert tree(example_repo / "rendered") == tree(Path(__file__).parent.parent / "rendered")
    [db] = (tmp_path / "cache").glob("*/cache.sqlite")
    with __import__("sqlite3").connect(db) as saved:
        assert saved.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 15 + 5 + 3, "saved before the exit"
    saved.close()
    assert run("compile", "--check")[0] == EXIT_OK
    policy = example_repo / "policies" / "bookinfo" / "reviews.yaml"
    policy.write_text(policy.read_text().replace("weight: 10", "weight: 110"))
    code, _, err = run("compile")
    assert code == EXIT_INVALID and "weight: 110 is out of range" in err
    assert err.endswith("meshc: 1 error; nothing written\n"), "every line reached the pipe"
    code, _, err = run("compile", "--env", "nope")
    assert code == EXIT_USAGE and err.startswith("meshc: error: no environment named nope")


def test_validate_writes_nothing(example_repo):
    shutil.rmtree(example_repo / "rendered")
    before = tree(example_repo)
    assert meshc("validate", "--repo", str(example_repo))[0] == EXIT_OK
    assert meshc("validate", "--repo", str(example_repo), "--env", "dev")[0] == EXIT_OK
    assert tree(example_repo) == before
    assert not (example_repo / "rendered").exists()


def test_a_full_compile_prunes_environments_that_are_gone(repo):
    (repo / "environments/staging.yaml").unlink()
    (repo / "rendered/notes.txt").write_text("kept: not an environment\n")
    (repo / "rendered/scratch").mkdir()  # no kustomization.yaml: not an environment meshc made

    assert meshc("compile", "--repo", str(repo), "--env", "prod")[0] == EXIT_OK
    assert (repo / "rendered/staging").is_dir()  # a partial compile prunes nothing

    assert meshc("compile", "--repo", str(repo))[0] == EXIT_OK
    assert sorted(p.name for p in (repo / "rendered").iterdir()) == ["dev", "notes.txt", "prod", "scratch"]


# -- the README workflow ---------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout


def test_editing_a_canary_weight_changes_exactly_the_weight_lines(repo):
    git(repo, "init", "-q")
    git(repo, "add", "policies", "environments", "rendered")
    git(repo, "commit", "-q", "-m", "start")
    prod = repo / "environments/prod.yaml"
    prod.write_text(prod.read_text().replace("traffic: {canary: {weight: 5}}", "traffic: {canary: {weight: 20}}"))

    assert meshc("compile", "--repo", str(repo))[0] == EXIT_OK

    changed = git(repo, "diff", "--name-only").split()
    assert changed == ["environments/prod.yaml", "rendered/prod/envoy/routes.json", "rendered/prod/istio/bookinfo/reviews.yaml"]
    assert _changed_lines(git(repo, "diff", "-U0", "--", "rendered/prod/istio/bookinfo/reviews.yaml")) == [
        "-      weight: 95", "-      weight: 5", "+      weight: 80", "+      weight: 20",
    ]
    routes = _changed_lines(git(repo, "diff", "-U0", "--", "rendered/prod/envoy/routes.json"))
    assert routes and all(re.search(r'"(weight|version_info)": ', line) for line in routes), routes
    assert sorted(line[0] for line in routes) == ["+"] * (len(routes) // 2) + ["-"] * (len(routes) // 2)


def _changed_lines(diff: str) -> list[str]:
    lines = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return sorted(lines, key=lambda line: line[0], reverse=True)  # removals first, each side in file order
