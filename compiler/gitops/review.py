"""`meshc diff`'s I/O: read both sides of a change from git (or the working tree),
compile them and compare. The comparison itself is `diff.compare` (pure)."""

from __future__ import annotations

import os
from pathlib import Path

from compiler.gitops.build import compile_pair, open_cache
from compiler.gitops.diff import Report, Side, compare
from compiler.gitops.source import open_repo, resolve, subtree, tree_files
from compiler.load import source_from_dir

WORKING_TREE = "working tree"


def diff_revisions(repo_dir: Path | str, base: str, head: str | None = None, cache: bool = True) -> Report:
    """Compare revision `base` with `head` (None: the working tree) of the meshc repo at `repo_dir`.

    `repo_dir` may be a subdirectory of the git repository (a monorepo): the
    policies are then read from that directory in both revisions. With
    `cache`, both compiles share the re-compile cache of `repo_dir`.
    Raises RepoError for a missing repository or an unknown revision.
    """
    repo = open_repo(repo_dir)
    prefix = _prefix(repo, Path(repo_dir))
    base_label, base_files = _read(repo, base, prefix)
    if head is None:
        head_label, head_files = WORKING_TREE, dict(source_from_dir(Path(repo_dir)).files)
    else:
        head_label, head_files = _read(repo, head, prefix)
    shared = open_cache(repo_dir) if cache else None
    try:
        base_result, head_result = compile_pair(base_files, head_files, shared)
    finally:
        if shared is not None:
            shared.close()
    return compare(Side(base_label, base_files, base_result), Side(head_label, head_files, head_result))


def _read(repo, rev: str, prefix: str) -> tuple[str, dict[str, bytes]]:
    commit = resolve(repo, rev)
    tree = subtree(repo, commit.tree, prefix)
    label = rev if rev.startswith(commit.short_id) else f"{rev} ({commit.short_id})"
    return label, tree_files(repo, tree) if tree is not None else {}


def _prefix(repo, repo_dir: Path) -> str:
    if repo.workdir is None:
        return ""
    rel = os.path.relpath(os.path.realpath(repo_dir), os.path.realpath(repo.workdir))
    return "" if rel == "." else Path(rel).as_posix()
