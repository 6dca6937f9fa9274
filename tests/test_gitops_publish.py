"""`meshc publish` with real repositories: commit-back, the rendered branch, pushes,
and two publishers racing for the same remote."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pygit2
import pytest

from compiler.cli import main
from compiler.gitops.build import render_files
from compiler.gitops.errors import CompileFailed, PublishError, RepoError
from compiler.gitops.publish import BOT, Identity, Options, publish, source_of
from compiler.gitops.source import tree_files
from test_gitops_support import (RATINGS, REVIEWS, SAMPLE, clone, commit_files, edit, git, make_remote,
                                 make_repo, read_tree)

NO_SLEEP = lambda seconds: None  # noqa: E731 - the retry pause is not what these tests measure


def rendered_of(repo: pygit2.Repository, commit: pygit2.Commit) -> dict[str, bytes]:
    """What `rendered/` must hold for `commit`'s source, per the real compiler."""
    outputs = render_files(tree_files(repo, commit.tree))
    return {f"{env}/{rel}": data for env, files in outputs.items() for rel, data in files.items()}


def rendered_in(repo: pygit2.Repository, commit: pygit2.Commit) -> dict[str, bytes]:
    return read_tree(repo, repo[commit.tree["rendered"].id]) if "rendered" in commit.tree else {}


def history(repo: pygit2.Repository, tip) -> list[pygit2.Commit]:
    return list(repo.walk(tip, pygit2.enums.SortMode.TOPOLOGICAL))


def assert_fresh(repo: pygit2.Repository, commit: pygit2.Commit) -> None:
    assert rendered_in(repo, commit) == rendered_of(repo, commit)


# --- commit-back -------------------------------------------------------------------------


def test_commit_back_commits_the_rendered_tree_once(tmp_path):
    repo = make_repo(tmp_path / "r")
    source = repo.head.peel(pygit2.Commit)

    first = publish(repo, Options())

    head = repo.head.peel(pygit2.Commit)
    assert first.commit == str(head.id) and first.source == str(source.id)
    assert head.parents == [source]
    assert head.message == f"meshc: render {source.short_id}\n\nSource-Commit: {source.id}\n"
    assert (head.author.name, head.author.email) == (BOT.name, BOT.email)
    assert_fresh(repo, head)
    assert {p.split("/")[0] for p in rendered_in(repo, head)} == {"dev", "staging", "prod"}
    assert git(tmp_path / "r", "status", "--porcelain") == ""  # working tree and index came along
    assert (tmp_path / "r/rendered/prod/istio/bookinfo/reviews.yaml").is_file()

    again = publish(repo, Options())
    assert again.commit is None and repo.head.target == head.id


def test_commit_back_after_an_edit_changes_only_what_the_edit_renders(tmp_path):
    repo = make_repo(tmp_path / "r")
    publish(repo, Options())
    commit_files(repo, {"policies/bookinfo/ratings.yaml": edit(RATINGS, "timeout: 2s", "timeout: 1s")},
                 "ratings: 1s timeout")
    author = Identity("CI", "ci@example.com")

    result = publish(repo, Options(author=author, committer=author))

    head = repo.head.peel(pygit2.Commit)
    assert str(head.id) == result.commit and head.author.email == "ci@example.com"
    changed = git(tmp_path / "r", "diff", "--name-only", "HEAD~1", "HEAD").split()
    assert changed and all(p.startswith("rendered/") for p in changed)
    assert "rendered/prod/istio/bookinfo/ratings.yaml" in changed
    assert not any("reviews.yaml" in p or "details.yaml" in p for p in changed)
    assert git(tmp_path / "r", "status", "--porcelain") == ""


def test_commit_back_refuses_a_detached_head_and_a_broken_source(tmp_path):
    repo = make_repo(tmp_path / "r")
    repo.set_head(repo.head.target)
    with pytest.raises(RepoError, match="detached"):
        publish(repo, Options())
    repo.set_head("refs/heads/main")
    before = commit_files(repo, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 101")}, "oops")
    with pytest.raises(CompileFailed) as failed:
        publish(repo, Options())
    assert any("reviews.yaml" in d.render() for d in failed.value.diagnostics)
    assert repo.head.target == before


# --- rendered branch ---------------------------------------------------------------------


def test_rendered_branch_holds_only_rendered_one_commit_per_source_commit(tmp_path):
    repo = make_repo(tmp_path / "r")
    first = publish(repo, Options(branch="rendered"))
    commit_files(repo, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 20")}, "canary 20")
    second = publish(repo, Options(branch="rendered"))
    commit_files(repo, {"README.md": "# docs only\n"}, "docs")
    third = publish(repo, Options(branch="rendered"))

    tip = repo.references["refs/heads/rendered"].peel(pygit2.Commit)
    assert str(tip.id) == second.commit and third.commit is None
    assert [c.name for c in tip.tree] == ["rendered"]
    assert [str(c.id) for c in history(repo, tip.id)] == [second.commit, first.commit]
    assert source_of(tip) == str(repo.head.peel(pygit2.Commit).parents[0].id)
    assert rendered_in(repo, tip) == rendered_of(repo, repo.head.peel(pygit2.Commit))
    assert repo.head.shorthand == "main" and "rendered" not in repo.head.peel(pygit2.Commit).tree


def test_rendered_branch_never_goes_back_to_an_older_source(tmp_path):
    """A slow CI run for an older commit must not overwrite the render of a newer one."""
    remote = make_remote(tmp_path)
    newer = clone(remote, tmp_path / "newer")
    older = clone(remote, tmp_path / "older")  # checked out before the next commit landed
    commit_files(newer, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 20")}, "canary 20")
    git(tmp_path / "newer", "push", "origin", "main")

    published = publish(newer, Options(branch="rendered", push="origin"), sleep=NO_SLEEP)
    late = publish(older, Options(branch="rendered", push="origin"), sleep=NO_SLEEP)

    assert published.pushed and late.commit is None
    bare = pygit2.Repository(str(remote))
    assert str(bare.references["refs/heads/rendered"].target) == published.commit


# --- pushing -----------------------------------------------------------------------------


def test_push_commit_back_to_a_bare_remote(tmp_path):
    remote = make_remote(tmp_path)
    work = clone(remote, tmp_path / "work")

    result = publish(work, Options(push="origin"), sleep=NO_SLEEP)

    bare = pygit2.Repository(str(remote))
    tip = bare.references["refs/heads/main"].peel(pygit2.Commit)
    assert result.pushed and str(tip.id) == result.commit == str(work.head.target)
    assert_fresh(bare, tip)
    git(tmp_path / "work", "fsck", "--strict")
    git(remote, "fsck", "--strict")
    assert publish(work, Options(push="origin"), sleep=NO_SLEEP).commit is None


def test_remote_moving_mid_publish_is_fetched_and_rendered_on_top(tmp_path):
    """Deterministic race: while A renders, B publishes; A's first push must fail and its retry win."""
    remote = make_remote(tmp_path)
    a, b = clone(remote, tmp_path / "a"), clone(remote, tmp_path / "b")
    a_source = commit_files(a, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 25")}, "A: canary 25")
    b_source = commit_files(b, {"policies/bookinfo/ratings.yaml": edit(RATINGS, "2s", "1s")}, "B: ratings 1s")
    calls = []

    def render_while_b_publishes(files, what):
        if not calls:
            calls.append(publish(b, Options(push="origin"), sleep=NO_SLEEP))
        return render_files(files, what)

    result = publish(a, Options(push="origin"), render=render_while_b_publishes, sleep=NO_SLEEP)

    assert calls[0].pushed and result.pushed and result.attempts == 2
    bare = pygit2.Repository(str(remote))
    tip = bare.references["refs/heads/main"].peel(pygit2.Commit)
    assert_sources_rendered_once(bare, tip, {"A: canary 25", "B: ratings 1s"})
    assert b_source in {c.id for c in history(bare, tip.id)}  # B's commit kept as is
    assert a_source not in {c.id for c in history(bare, tip.id)}  # A's was replayed on top of B's
    assert a.head.target == tip.id and git(tmp_path / "a", "status", "--porcelain") == ""


def assert_sources_rendered_once(repo, tip: pygit2.Commit, messages: set[str]) -> None:
    commits = history(repo, tip.id)
    sources = [c.message.strip() for c in commits if "Source-Commit" not in c.message]
    renders = [c for c in commits if "Source-Commit" in c.message]
    assert messages <= set(sources) and len(sources) == len(set(sources)), sources  # none lost, none twice
    assert len({source_of(c) for c in renders}) == len(renders)  # one render per source commit at most
    for render in renders:  # and none of them empty
        assert render.tree_id != render.parents[0].tree_id
    assert_fresh(repo, tip)


def race(target, args: list[tuple]) -> list:
    """Run `target(barrier, *a, queue)` in one forked process per `a`, released together by the
    barrier; → what each put on the queue."""
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(len(args)), ctx.Queue()
    workers = [ctx.Process(target=target, args=(barrier, *a, queue)) for a in args]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    return [queue.get(timeout=5) for _ in workers]


def _publish_after(barrier, path: str, queue) -> None:
    repo = pygit2.Repository(path)
    barrier.wait()
    try:
        result = publish(repo, Options(push="origin", backoff_s=0.01))
        queue.put((path, result.pushed, result.attempts))
    except Exception as err:  # reported to the parent, which fails the test
        queue.put((path, "error", repr(err)))


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_publishing_at_once_lose_nothing(tmp_path, round_):
    remote = make_remote(tmp_path)
    a, b = clone(remote, tmp_path / "a"), clone(remote, tmp_path / "b")
    commit_files(a, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 30")}, "A: canary 30")
    commit_files(b, {"environments/dev.yaml": SAMPLE["environments/dev.yaml"].replace("10s", "3s")}, "B: dev 3s")
    results = race(_publish_after, [(repo.workdir,) for repo in (a, b)])

    assert all(r[1] is True for r in results), results
    bare = pygit2.Repository(str(remote))
    tip = bare.references["refs/heads/main"].peel(pygit2.Commit)
    assert_sources_rendered_once(bare, tip, {"A: canary 30", "B: dev 3s"})
    git(remote, "fsck", "--strict")


def test_ci_runs_for_consecutive_commits_make_one_render(tmp_path):
    """Two merges land, two CI runs start (each on its own commit): one render commit results."""
    remote = make_remote(tmp_path)
    dev = clone(remote, tmp_path / "dev")
    commit_files(dev, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 15")}, "S1")
    git(tmp_path / "dev", "push", "origin", "main")
    run1 = clone(remote, tmp_path / "run1")  # CI run for S1
    commit_files(dev, {"policies/bookinfo/ratings.yaml": edit(RATINGS, "2s", "3s")}, "S2")
    git(tmp_path / "dev", "push", "origin", "main")
    run2 = clone(remote, tmp_path / "run2")  # CI run for S2

    second = publish(run2, Options(push="origin"), sleep=NO_SLEEP)
    first = publish(run1, Options(push="origin"), sleep=NO_SLEEP)

    assert second.pushed and first.commit is None and not first.pushed
    bare = pygit2.Repository(str(remote))
    tip = bare.references["refs/heads/main"].peel(pygit2.Commit)
    assert str(tip.id) == second.commit and run1.head.target == tip.id
    assert_sources_rendered_once(bare, tip, {"S1", "S2"})


def test_push_to_a_checked_out_branch_of_a_non_bare_remote_is_refused(tmp_path, capsys):
    """As git's receive.denyCurrentBranch: the owner's working tree and index would go stale."""
    owner = make_repo(tmp_path / "owner")  # a non-bare repository, main checked out
    work = clone(Path(owner.workdir), tmp_path / "work")
    before = owner.head.target

    with pytest.raises(PublishError, match=r"refusing to update checked out branch refs/heads/main in "
                                           rf"{tmp_path / 'owner'}: .*push to a bare repository"):
        publish(work, Options(push="origin"), sleep=NO_SLEEP)
    assert owner.head.target == before and git(tmp_path / "owner", "status", "--porcelain") == ""
    assert meshc("publish", "--repo", work.workdir, "--push", "origin") == 1
    assert capsys.readouterr().err.startswith("meshc: error: refusing to update checked out branch")

    # another branch of the same repository may move: nothing has it checked out
    published = publish(work, Options(branch="rendered", push="origin"), sleep=NO_SLEEP)
    assert str(owner.references["refs/heads/rendered"].target) == published.commit
    # a linked worktree's checkout counts too
    git(tmp_path / "owner", "worktree", "add", "-q", str(tmp_path / "linked"), "rendered")
    commit_files(work, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 40")}, "canary 40")
    with pytest.raises(PublishError, match=f"checked out branch refs/heads/rendered in {tmp_path / 'linked'}"):
        publish(work, Options(branch="rendered", push="origin"), sleep=NO_SLEEP)
    # and the owner can allow it, as in git
    git(tmp_path / "owner", "config", "receive.denyCurrentBranch", "ignore")
    assert publish(work, Options(push="origin"), sleep=NO_SLEEP).pushed


def test_push_errors_are_publish_errors(tmp_path):
    repo = make_repo(tmp_path / "r")
    with pytest.raises(PublishError, match="no remote named 'upstream'"):
        publish(repo, Options(push="upstream"))
    repo.remotes.create("gone", str(tmp_path / "missing.git"))
    with pytest.raises(PublishError):
        publish(repo, Options(push="gone"))


# --- the command ---------------------------------------------------------------------------


def meshc(*argv: str) -> int:
    """`meshc ARGS...` in this process: the real entry point."""
    return main(list(argv))


def test_publish_command_reports_and_exits(tmp_path, capsys):
    repo = make_repo(tmp_path / "r")
    where = repo.workdir
    assert meshc("publish", "--repo", where, "--author", "Render Bot <render@example.com>") == 0
    assert capsys.readouterr().out.startswith("committed ")
    assert repo.head.peel(pygit2.Commit).committer.email == "render@example.com"  # committer follows author
    (Path(where) / "policies/bookinfo/ratings.yaml").write_text(edit(RATINGS, "2s", "3s"))
    assert meshc("publish", "--repo", where) == 0
    out, err = capsys.readouterr()
    assert out.startswith("nothing to publish: main already renders ")
    assert err == ("meshc: note: published HEAD; uncommitted changes to policies/bookinfo/ratings.yaml "
                   "are not in it\n")
    git(Path(where), "checkout", "--", "policies")

    commit_files(repo, {"policies/bookinfo/reviews.yaml": edit(REVIEWS, "weight: 10", "weight: 101")}, "oops")
    assert meshc("publish", "--repo", where) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("policies/bookinfo/reviews.yaml:") and ": error: " in err[0]
    assert err[-1].startswith("meshc: error: commit ") and "does not compile" in err[-1]

    repo.set_head(repo.head.target)
    assert meshc("publish", "--repo", where) == 2
    assert "detached" in capsys.readouterr().err
    assert meshc("publish", "--repo", str(Path(where) / "policies"), "--branch", "r") == 2
    assert "top of the git repository" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        meshc("publish", "--repo", where, "--author", "no email")
