"""The GitOps loop end to end, as a new user and CI run it: `meshc` processes on
throwaway clones of the example repository, with a bare repository as origin."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pygit2

from test_gitops_publish import assert_sources_rendered_once
from test_gitops_support import git

REPO = Path(__file__).resolve().parent.parent
MESHC = [sys.executable, "-m", "compiler"]


def meshc(cwd: Path, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([*MESHC, *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd)})
    if check_rc is not None:
        assert done.returncode == check_rc, done.stdout + done.stderr
    return done


def example_origin(tmp_path: Path) -> Path:
    """origin.git holding the example policies and environments (no rendered/ yet) on main."""
    seed = tmp_path / "seed"
    for part in ("policies", "environments"):
        shutil.copytree(REPO / part, seed / part)
    (seed / "README.md").write_text("# mesh policies\n")
    git(seed.parent, "init", "-q", "-b", "main", str(seed))
    git(seed, "add", ".")
    git(seed, "commit", "-qm", "example mesh")
    git(tmp_path, "init", "-q", "--bare", "-b", "main", "origin.git")
    git(seed, "push", "-q", str(tmp_path / "origin.git"), "main")
    return tmp_path / "origin.git"


def bump_weight(path: Path, by: int) -> tuple[int, int]:
    """Raise the first `weight:` in the file; (old, new)."""
    text = path.read_text()
    old = int(re.search(r"weight: (\d+)", text).group(1))
    path.write_text(text.replace(f"weight: {old}", f"weight: {old + by}", 1))
    return old, old + by


def test_a_new_user_edits_a_canary_reads_the_diff_and_ci_publishes_once(tmp_path):
    origin = example_origin(tmp_path)
    ci = tmp_path / "ci"
    git(tmp_path, "clone", "-q", str(origin), str(ci))
    assert "committed" in meshc(ci, "publish", "--push", "origin").stdout  # first render of main

    user = tmp_path / "user"
    git(tmp_path, "clone", "-q", str(origin), str(user))
    git(user, "checkout", "-q", "-b", "more-canary")
    # Every example environment pins the reviews canary, so the policy's own weight changes nothing ...
    bump_weight(user / "policies/bookinfo/reviews.yaml", 10)
    pinned = meshc(user, "diff", "--base", "main")
    assert "No environment changes." in pinned.stdout
    assert "! bookinfo/reviews: policies/bookinfo/reviews.yaml changed but no environment renders it differently" \
        in pinned.stdout
    git(user, "checkout", "-q", "--", "policies")
    # ... prod's override does.
    old, new = bump_weight(user / "environments/prod.yaml", 5)
    diff = meshc(user, "diff", "--base", "main")
    step = ", step 1 of 4" if new == 10 else ""  # the example's schedule is [10, 25, 50, 100]
    assert diff.stdout.splitlines()[2] == f"  prod · bookinfo/reviews: canary v2 {old}% → {new}%{step}"
    assert f"~ spec.http[default].route[v2].weight: {old} → {new}" in diff.stdout
    assert meshc(user, "diff", "--base", "main", "--exit-code", check_rc=1).stdout == diff.stdout

    git(user, "commit", "-qam", "prod: more canary")
    git(user, "push", "-q", "origin", "more-canary:main")  # merged
    git(ci, "pull", "-q", "--ff-only")
    first = meshc(ci, "publish", "--push", "origin")
    again = meshc(ci, "publish", "--push", "origin")

    assert first.stdout.startswith("committed ") and again.stdout.startswith("nothing to publish")
    log = git(ci, "log", "--format=%s", "origin/main").splitlines()
    assert log[:2] == [f"meshc: render {git(ci, 'rev-parse', '--short', 'HEAD~1').strip()}", "prod: more canary"]
    assert sum(s.startswith("meshc: render") for s in log) == 2  # the first render and this one
    changed = git(ci, "diff", "--name-only", "HEAD~1", "HEAD").split()
    assert "rendered/prod/istio/bookinfo/reviews.yaml" in changed
    assert not any(p.startswith(("rendered/dev/", "rendered/staging/")) for p in changed)
    check = subprocess.run([sys.executable, "-m", "compiler", "compile", "--check", "--repo", str(ci)],
                           capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert check.returncode == 0, check.stdout + check.stderr  # what was published is what compile makes


def test_two_ci_processes_publish_at_once(tmp_path):
    origin = example_origin(tmp_path)
    clones = []
    for name, file in (("a", "policies/bookinfo/reviews.yaml"), ("b", "policies/bookinfo/ratings.yaml")):
        path = tmp_path / name
        git(tmp_path, "clone", "-q", str(origin), str(path))
        text = (path / file).read_text()
        (path / file).write_text(re.sub(r"timeout: (\d+)s", lambda m: f"timeout: {int(m.group(1)) + 1}s", text, 1))
        git(path, "commit", "-qam", f"{name}: longer timeout")
        clones.append(path)

    runs = [subprocess.Popen([*MESHC, "publish", "--push", "origin"], cwd=c, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
            for c in clones]
    outputs = [r.communicate(timeout=300) for r in runs]

    assert [r.returncode for r in runs] == [0, 0], outputs
    bare = pygit2.Repository(str(origin))
    assert_sources_rendered_once(bare, bare.references["refs/heads/main"].peel(pygit2.Commit),
                                 {"a: longer timeout", "b: longer timeout"})
