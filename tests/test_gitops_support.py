"""Real git repositories for the GitOps tests, and tests of reading a Source from git.

The helpers build a small bookinfo mesh (three services, three environments)
in a fresh repository, commit edits to it, and read results back. Other
`test_gitops_*` modules import them from here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pygit2
import pytest

from compiler.gitops.errors import RepoError
from compiler.gitops.source import open_repo, resolve, tree_files
from compiler.load import source_from_dir

AUTHOR = pygit2.Signature("Dev Eloper", "dev@example.com")

REVIEWS = """\
apiVersion: meshc.dev/v1
kind: TrafficPolicy
metadata:
  name: reviews
  namespace: bookinfo
spec:
  selector: {app: reviews}
  ports:
    - {name: http, port: 9080, targetPort: 9080, protocol: HTTP}
  versions:
    v1: {labels: {version: v1}}
    v2: {labels: {version: v2}}
  traffic:
    stable: v1
    canary: {version: v2, weight: 10}
  timeout: 4s
  retries: {attempts: 3, perTryTimeout: 1s, retryOn: [5xx, connect-failure]}
"""

RATINGS = """\
apiVersion: meshc.dev/v1
kind: TrafficPolicy
metadata:
  name: ratings
  namespace: bookinfo
spec:
  selector: {app: ratings}
  ports:
    - {name: http, port: 9080, targetPort: 9080, protocol: HTTP}
  timeout: 2s
"""

DETAILS = """\
apiVersion: meshc.dev/v1
kind: TrafficPolicy
metadata:
  name: details
  namespace: bookinfo
spec:
  selector: {app: details}
  ports:
    - {name: http, port: 9080, targetPort: 9080, protocol: HTTP}
  versions:
    v1: {labels: {version: v1}}
    v2: {labels: {version: v2}}
  traffic: {split: {v1: 50, v2: 50}}
"""


def environment(name: str, extra: str = "") -> str:
    return f"""\
apiVersion: meshc.dev/v1
kind: Environment
metadata: {{name: {name}}}
spec:
  defaults: {{timeout: 10s}}
{extra}"""


PROD_OVERRIDES = """\
  overrides:
    bookinfo/reviews: {traffic: {canary: {weight: 5}}}
"""

SAMPLE = {
    "policies/bookinfo/reviews.yaml": REVIEWS,
    "policies/bookinfo/ratings.yaml": RATINGS,
    "policies/bookinfo/details.yaml": DETAILS,
    "environments/dev.yaml": environment("dev"),
    "environments/staging.yaml": environment("staging"),
    "environments/prod.yaml": environment("prod", PROD_OVERRIDES),
    "README.md": "# sample mesh\n",
}


def git(cwd: Path, *args: str) -> str:
    """Run the git CLI (for assertions and set-up the way a user would do it)."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd),
           "GIT_AUTHOR_NAME": "Dev Eloper", "GIT_AUTHOR_EMAIL": "dev@example.com",
           "GIT_COMMITTER_NAME": "Dev Eloper", "GIT_COMMITTER_EMAIL": "dev@example.com"}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def make_repo(path: Path, files: dict[str, str] = SAMPLE, message: str = "sample mesh") -> pygit2.Repository:
    """A fresh non-bare repository on branch main holding `files` in one commit."""
    repo = pygit2.init_repository(str(path), initial_head="main")
    commit_files(repo, files, message)
    return repo


def commit_files(repo: pygit2.Repository, changes: dict[str, str | None], message: str) -> pygit2.Oid:
    """Write (None: delete) files in the working tree and commit them on HEAD."""
    root = Path(repo.workdir)
    for rel, text in changes.items():
        path = root / rel
        if text is None:
            path.unlink()
            repo.index.remove(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            repo.index.add(rel)
    repo.index.write()
    tree = repo.index.write_tree()
    parents = [] if repo.head_is_unborn else [repo.head.target]
    return repo.create_commit("HEAD", AUTHOR, AUTHOR, message, tree, parents)


def make_remote(tmp_path: Path, files: dict[str, str] = SAMPLE) -> Path:
    """A bare repository (the "origin") seeded with `files` on main."""
    seed = make_repo(tmp_path / "seed", files)
    bare = tmp_path / "origin.git"
    pygit2.init_repository(str(bare), bare=True, initial_head="main")
    seed.remotes.create("origin", str(bare))
    seed.remotes["origin"].push(["refs/heads/main:refs/heads/main"])
    return bare


def clone(remote: Path, path: Path) -> pygit2.Repository:
    return pygit2.clone_repository(str(remote), str(path))


def read_tree(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = "") -> dict[str, bytes]:
    """Every blob under `tree`, path → bytes."""
    out = {}
    for entry in tree:
        path = f"{prefix}{entry.name}"
        if entry.type_str == "tree":
            out.update(read_tree(repo, repo[entry.id], path + "/"))
        else:
            out[path] = repo[entry.id].data
    return out


def edit(text: str, old: str, new: str) -> str:
    assert old in text, (old, text)
    return text.replace(old, new)


# --- tests of compiler.gitops.source ---------------------------------------------------


def test_tree_files_match_the_working_tree(tmp_path):
    repo = make_repo(tmp_path / "r", {**SAMPLE, "policies/.hidden.yaml": "x: 1\n",
                                      "policies/notes.txt": "n\n", "environments/old/x.yaml": "x\n"})
    files = tree_files(repo, repo.head.peel(pygit2.Commit).tree)
    assert files == dict(source_from_dir(tmp_path / "r").files)
    assert list(files) == sorted(files)
    assert "README.md" not in files and "policies/notes.txt" not in files
    assert "environments/old/x.yaml" not in files


def test_tree_files_reads_an_old_revision_without_checkout(tmp_path):
    repo = make_repo(tmp_path / "r")
    first = repo.head.target
    commit_files(repo, {"policies/bookinfo/details.yaml": None}, "drop details")
    old = tree_files(repo, resolve(repo, str(first)).tree)
    assert "policies/bookinfo/details.yaml" in old
    assert "policies/bookinfo/details.yaml" not in tree_files(repo, resolve(repo, "HEAD").tree)
    assert set(tree_files(repo, resolve(repo, "HEAD~1").tree)) == set(old)


def test_resolve_and_open_errors_are_one_line(tmp_path):
    repo = make_repo(tmp_path / "r")
    for bad in ("no-such-branch", "HEAD~9", "main:README.md", "@@{"):
        with pytest.raises(RepoError) as err:
            resolve(repo, bad)
        assert "\n" not in str(err.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(RepoError, match="not inside a git repository"):
        open_repo(tmp_path / "plain")
    assert open_repo(tmp_path / "r" / "policies").workdir.rstrip("/") == str(tmp_path / "r")
