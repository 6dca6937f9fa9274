"""Commit rendered output to git with pygit2, and push it without losing anyone's commit.

Two layouts (DESIGN: `meshc publish [--branch NAME] [--push REMOTE]`):

- commit-back (default): on the current branch, a commit on top of the
  source commit whose tree is the source tree with `rendered/` replaced;
- rendered branch (`--branch NAME`): a branch whose tree holds only
  `rendered/`, one commit per source commit, each on top of the last.

Either way the commit message is `meshc: render <short sha>`, a blank line
and a `Source-Commit: <full sha>` trailer, and no commit is made when the
rendered tree would not change. The source is always a commit (HEAD), never
the working tree, so the trailer tells the truth.

With a remote, publishing is a compare-and-swap loop: fetch the branch,
build on top of it (replaying local source commits the remote lacks), push
only if the remote still points where we fetched it, else start over. Two
CI runs publishing at once thus end with every source commit rendered once.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import pygit2
from pygit2.enums import CheckoutStrategy, FileMode, SortMode

from compiler.gitops.build import Outputs, Render, render_files
from compiler.gitops.errors import PublishError, RepoError
from compiler.gitops.remote import Credentials, fetch_branch, push_ref
from compiler.gitops.source import tree_files

RENDERED = "rendered"
TRAILER = "Source-Commit"


@dataclass(frozen=True)
class Identity:
    name: str
    email: str

    def signature(self) -> pygit2.Signature:
        return pygit2.Signature(self.name, self.email)

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


BOT = Identity("meshc-bot", "meshc-bot@users.noreply.github.com")


@dataclass(frozen=True)
class Options:
    branch: str | None = None  # the rendered-manifests branch; None commits back on the current branch
    push: str | None = None  # remote name
    author: Identity = BOT
    committer: Identity = BOT
    credentials: Credentials = Credentials()
    attempts: int = 8  # compare-and-swap rounds before giving up on a remote that keeps moving
    backoff_s: float = 0.2  # the mean pause between rounds grows linearly from this


@dataclass(frozen=True)
class Published:
    ref: str  # the local branch updated, e.g. refs/heads/main
    source: str  # full sha of the source commit rendered
    commit: str | None  # the render commit made, None when nothing changed
    pushed: bool = False
    attempts: int = 1
    notes: tuple[str, ...] = field(default=())


def publish(repo: pygit2.Repository, options: Options, render: Render = render_files,
            sleep: Callable[[float], None] = time.sleep) -> Published:
    """Render HEAD and commit (and push) it as `options` say. Raises GitOpsError subclasses."""
    if repo.head_is_unborn:
        raise RepoError("the repository has no commits yet")
    if options.branch:
        return _publish_branch(repo, options, render, sleep)
    return _publish_back(repo, options, render, sleep)


# --- commit-back ---------------------------------------------------------------

def _publish_back(repo, options: Options, render: Render, sleep) -> Published:
    if repo.head_is_detached:
        raise RepoError("HEAD is detached: check out a branch to commit back to, or use --branch NAME")
    ref = repo.head.name
    branch = repo.head.shorthand
    local = repo.head.target
    for attempt in range(1, options.attempts + 1):
        remote_tip = fetch_branch(repo, options.push, branch, options.credentials) if options.push else None
        base = _integrate(repo, local, remote_tip, options) if options.push else local
        made = render_commit(repo, repo[base], options, render)
        new = made or base
        if options.push and new != remote_tip:
            if not push_ref(repo, options.push, branch, new, remote_tip, options.credentials):
                sleep(options.backoff_s * attempt * (0.5 + random.random()))
                continue
        notes = _move_local(repo, ref, local, new)
        return Published(ref, source_of(repo[new]), str(made) if made else None,
                         pushed=bool(options.push) and new != remote_tip, attempts=attempt, notes=notes)
    raise PublishError(f"{options.push}/{branch} kept moving: gave up after {options.attempts} attempts")


def _integrate(repo, local: pygit2.Oid, remote_tip: pygit2.Oid | None, options: Options) -> pygit2.Oid:
    """The commit to render on: whichever of local and remote contains the other,
    else the remote with the local-only source commits replayed on top."""
    if remote_tip is None or remote_tip == local or repo.descendant_of(local, remote_tip):
        return local
    if repo.descendant_of(remote_tip, local):
        return remote_tip
    return _replay(repo, local, remote_tip, options.committer)


def _replay(repo, local: pygit2.Oid, onto: pygit2.Oid, committer: Identity) -> pygit2.Oid:
    """Rebase the source commits of `local` that `onto` lacks, dropping render commits
    (their output is rendered afresh) and ignoring `rendered/` while merging."""
    walker = repo.walk(local, SortMode.TOPOLOGICAL | SortMode.REVERSE)
    walker.hide(onto)
    tip = onto
    for commit in walker:
        if len(commit.parents) > 1:
            raise PublishError(f"cannot publish: local merge commit {commit.short_id} is not on the remote yet; "
                               "push it or rebase first")
        if is_render_commit(commit):
            continue
        parent_tree = commit.parents[0].tree if commit.parents else _empty_tree(repo)
        index = repo.merge_trees(_strip(repo, parent_tree), _strip(repo, repo[tip].tree), _strip(repo, commit.tree))
        if index.conflicts is not None:
            paths = sorted({e.path for c in index.conflicts for e in c if e is not None})
            raise PublishError(f"cannot publish: local commit {commit.short_id} conflicts with the remote "
                               f"in {', '.join(paths)}; pull and resolve first")
        tree = _with_rendered(repo, repo[index.write_tree(repo)], _rendered_entry(repo[tip].tree))
        tip = repo.create_commit(None, commit.author, committer.signature(), commit.message, tree, [tip])
    return tip


def _move_local(repo, ref: str, old: pygit2.Oid, new: pygit2.Oid) -> tuple[str, ...]:
    """Point the checked-out branch at `new`, bringing the working tree along
    without touching files the user changed (SAFE checkout against HEAD)."""
    if new == old:
        return ()
    notes = ()
    if not repo.is_bare:
        try:
            repo.checkout_tree(repo[new], strategy=CheckoutStrategy.SAFE)
        except pygit2.GitError as err:
            notes = (f"the working tree was not updated ({err}); run `git reset --keep HEAD`",)
    repo.references[ref].set_target(new, "meshc publish")
    return notes


# --- rendered branch -------------------------------------------------------------

def _publish_branch(repo, options: Options, render: Render, sleep) -> Published:
    ref = f"refs/heads/{options.branch}"
    source = repo.head.peel(pygit2.Commit)
    source_sha = source_of(source)
    tree = _with_rendered(repo, _empty_tree(repo), rendered_tree(repo, _render(repo, source, render)))
    local = _target(repo, ref)
    for attempt in range(1, options.attempts + 1):
        parent = fetch_branch(repo, options.push, options.branch, options.credentials) if options.push else local
        if parent is not None and (repo[parent].tree_id == tree or _supersedes(repo, parent, source_sha, options)):
            _set_ref(repo, ref, local, parent)
            return Published(ref, source_sha, None, attempts=attempt)
        new = repo.create_commit(None, options.author.signature(), options.committer.signature(),
                                 message(source_sha, repo[source_sha].short_id if source_sha in repo else source_sha[:7]),
                                 tree, [parent] if parent else [])
        if options.push and not push_ref(repo, options.push, options.branch, new, parent, options.credentials):
            sleep(options.backoff_s * attempt * (0.5 + random.random()))
            continue
        _set_ref(repo, ref, local, new)
        return Published(ref, source_sha, str(new), pushed=bool(options.push), attempts=attempt)
    raise PublishError(f"{options.push}/{options.branch} kept moving: gave up after {options.attempts} attempts")


def _supersedes(repo, parent: pygit2.Oid, source_sha: str, options: Options) -> bool:
    """Whether the branch already renders a newer source commit than ours."""
    theirs = source_of(repo[parent])
    if theirs == source_sha:
        return False
    if theirs not in repo and options.push and not repo.head_is_detached:
        fetch_branch(repo, options.push, repo.head.shorthand, options.credentials)
    return theirs in repo and repo.descendant_of(theirs, source_sha)


def _target(repo, ref: str) -> pygit2.Oid | None:
    found = repo.references.get(ref)
    return found.target if found is not None else None


def _set_ref(repo, ref: str, old: pygit2.Oid | None, new: pygit2.Oid | None) -> None:
    if new is None or new == old:
        return
    if old is None:
        repo.references.create(ref, new, force=True)
    else:
        repo.references[ref].set_target(new, "meshc publish")


# --- trees and messages ----------------------------------------------------------

def render_commit(repo, source: pygit2.Commit, options: Options, render: Render) -> pygit2.Oid | None:
    """A commit on `source` with `rendered/` brought up to date, or None if it already is."""
    tree = _with_rendered(repo, source.tree, rendered_tree(repo, _render(repo, source, render)))
    if tree == source.tree_id:
        return None
    sha = source_of(source)
    short = repo[sha].short_id if sha in repo else sha[:7]
    return repo.create_commit(None, options.author.signature(), options.committer.signature(),
                              message(sha, short), tree, [source.id])


def _render(repo, source: pygit2.Commit, render: Render) -> Outputs:
    return render(tree_files(repo, source.tree), f"commit {source.short_id}")


def message(source_sha: str, short: str) -> str:
    return f"meshc: render {short}\n\n{TRAILER}: {source_sha}\n"


def is_render_commit(commit: pygit2.Commit) -> bool:
    return TRAILER in (commit.message_trailers or {})


def source_of(commit: pygit2.Commit) -> str:
    """The source commit a render commit renders; a source commit's own sha otherwise."""
    return (commit.message_trailers or {}).get(TRAILER) or str(commit.id)


def rendered_tree(repo, outputs: Outputs) -> pygit2.Oid | None:
    """The tree of `rendered/` for `outputs` (None when there is no environment)."""
    root: dict = {}
    for env, files in outputs.items():
        for rel, data in files.items():
            node = root.setdefault(env, {})
            *dirs, name = rel.split("/")
            for d in dirs:
                node = node.setdefault(d, {})
            node[name] = data
    return _write_tree(repo, root) if root else None


def _write_tree(repo, node: dict) -> pygit2.Oid:
    builder = repo.TreeBuilder()
    for name, child in node.items():
        if isinstance(child, dict):
            builder.insert(name, _write_tree(repo, child), FileMode.TREE)
        else:
            builder.insert(name, repo.create_blob(child), FileMode.BLOB)
    return builder.write()


def _with_rendered(repo, tree: pygit2.Tree, rendered: pygit2.Oid | None) -> pygit2.Oid:
    builder = repo.TreeBuilder(tree)
    if rendered is not None:
        builder.insert(RENDERED, rendered, FileMode.TREE)
    elif builder.get(RENDERED) is not None:
        builder.remove(RENDERED)
    return builder.write()


def _rendered_entry(tree: pygit2.Tree) -> pygit2.Oid | None:
    return tree[RENDERED].id if RENDERED in tree else None


def _strip(repo, tree: pygit2.Tree) -> pygit2.Tree:
    return repo[_with_rendered(repo, tree, None)]


def _empty_tree(repo) -> pygit2.Tree:
    return repo[repo.TreeBuilder().write()]
