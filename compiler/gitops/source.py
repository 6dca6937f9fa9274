"""Read meshc's input straight from git objects: no checkout, no working tree.

`open_repo` finds the repository, `resolve` turns a revision into a commit,
and `tree_files` collects the files a `compiler.load.Source` holds
(`policies/**/*.yaml` and `environments/*.yaml`) from a commit's tree.
"""

from __future__ import annotations

from pathlib import Path

import pygit2
from pygit2.enums import FileMode

from compiler.gitops.errors import RepoError
from compiler.load import ENVIRONMENT_DIR, POLICY_DIR, is_input_path


def open_repo(path: Path | str) -> pygit2.Repository:
    """The repository containing `path` (which may be a subdirectory)."""
    found = pygit2.discover_repository(str(path))
    if found is None:
        raise RepoError(f"{path} is not inside a git repository")
    return pygit2.Repository(found)


def resolve(repo: pygit2.Repository, rev: str) -> pygit2.Commit:
    """The commit `rev` names (a branch, tag, sha, `origin/main`, `HEAD~2`, ...)."""
    try:
        obj = repo.revparse_single(rev)
        return obj.peel(pygit2.Commit)
    except (KeyError, ValueError, pygit2.InvalidSpecError):
        raise RepoError(f"unknown revision {rev!r}") from None
    except pygit2.GitError:  # a tree or blob named by rev: it peels to no commit
        raise RepoError(f"{rev!r} does not name a commit") from None


def subtree(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str) -> pygit2.Tree | None:
    """The tree at `prefix` (a POSIX path, "" for the root), None when it is absent."""
    for part in filter(None, prefix.split("/")):
        if part not in tree or tree[part].filemode != FileMode.TREE:
            return None
        tree = repo[tree[part].id]
    return tree


def tree_files(repo: pygit2.Repository, tree: pygit2.Tree) -> dict[str, bytes]:
    """The Source files of `tree`, repo-relative POSIX path → bytes, in path order.

    The same files `compiler.load.source_from_dir` reads from a working tree:
    `is_input_path` decides, and names starting with a dot are skipped.
    Symlinks and submodules are skipped too: they have no content here.
    """
    files: dict[str, bytes] = {}
    for top in (POLICY_DIR, ENVIRONMENT_DIR):
        if top in tree and tree[top].filemode == FileMode.TREE:
            _collect(repo, repo[tree[top].id], top, files)
    return dict(sorted(files.items()))


def _collect(repo, tree: pygit2.Tree, prefix: str, files: dict) -> None:
    for entry in tree:
        if entry.name.startswith("."):
            continue
        path = f"{prefix}/{entry.name}"
        if entry.filemode == FileMode.TREE:
            _collect(repo, repo[entry.id], path, files)
        elif entry.filemode in (FileMode.BLOB, FileMode.BLOB_EXECUTABLE) and is_input_path(path):
            files[path] = repo[entry.id].data
