"""write_rendered replaces rendered/ all-or-nothing: a failure at any step of the swap puts it back.

Real directories throughout; a failure is injected by making one numbered call
of os.rename (or of the renameat2 exchange, emit._exchange) raise, every other
call going through to the real one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from pathlib import Path

import pytest

from compiler import emit
from compiler.cli import main
from compiler.emit import RollbackError, write_rendered

OLD = {
    "dev": {"kustomization.yaml": b"dev k\n", "istio/a/x.yaml": b"dev x\n", "envoy/clusters.json": b"same\n"},
    "staging": {"kustomization.yaml": b"staging k\n", "istio/a/x.yaml": b"staging x\n"},
    "prod": {"kustomization.yaml": b"prod k\n", "istio/b/y.yaml": b"prod y\n"},
    "qa": {"kustomization.yaml": b"qa k\n"},  # no longer compiled: pruned
}
NEW = {
    "dev": {"kustomization.yaml": b"dev k2\n", "istio/a/x.yaml": b"dev x\n", "envoy/clusters.json": b"same\n"},
    "staging": {"kustomization.yaml": b"staging k2\n", "istio/c/z.yaml": b"staging z\n"},
    "prod": {"kustomization.yaml": b"prod k\n", "istio/b/y.yaml": b"prod y2\n"},
}


def test_an_exchange_that_fails_says_why_rather_than_falling_back(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError):  # not False, which would send write_rendered down the two-rename path
        emit._exchange(str(tmp_path / "missing"), tmp_path / "b")
    assert (tmp_path / "b").is_dir()


def _make(root: Path, layout: str) -> Path:
    """rendered/ with three environments, a stale one, and what is not an environment.
    "mixed": staging does not exist yet and prod is a planted symlink to a directory outside."""
    out = root / "rendered"
    for env, files in OLD.items():
        if layout == "mixed" and env == "staging":
            continue
        base = root / "outside" if layout == "mixed" and env == "prod" else out / env
        for rel, data in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(data)
    if layout == "mixed":
        (out / "prod").symlink_to(root / "outside")
    (out / "notes").mkdir()
    (out / "notes" / "README").write_bytes(b"not an environment\n")
    (out / "top.txt").write_bytes(b"beside the environments\n")
    return out


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below `root`, never following a link: kind, mode, inode, link count and bytes or target."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", st.st_mode, st.st_ino)
            else:
                entries[rel] = ("file", st.st_mode, st.st_ino, st.st_nlink, Path(path).read_bytes())
    return entries


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class _Steps:
    """Counts the renames and exchanges write_rendered makes; the calls numbered in `fail` raise EIO."""

    def __init__(self, monkeypatch, fallback: bool, fail: set[int] = frozenset()):
        self.calls, self.fail = 0, fail
        if fallback:  # as on a system without renameat2
            monkeypatch.setattr(emit, "_libc", lambda: None)
        else:
            monkeypatch.setattr(emit, "_exchange", self._counted(emit._exchange))
        monkeypatch.setattr(os, "rename", self._counted(os.rename))

    def _counted(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls in self.fail:
                raise OSError(errno.EIO, f"injected failure {self.calls}")
            return real(*args, **kwargs)

        return call


# Steps of the replacement, in order. An environment that exists changes only where it differs:
# a directory of files that changed (prod's istio/b) is exchanged whole, a changed file beside
# directories (kustomization.yaml) alone, a new directory renamed in, one no longer produced
# renamed aside. A new environment is renamed in, a planted symlink exchanged for a whole tree,
# a pruned one renamed aside. Two renames: target aside, new entry in.
STEPS = {
    ("plain", False): ["exchange dev/kustomization.yaml", "rename staging/istio/c in", "staging/istio/a aside",
                       "exchange staging/kustomization.yaml", "exchange prod/istio/b", "prune qa"],
    ("plain", True): ["dev/kustomization.yaml aside", "dev/kustomization.yaml in", "staging/istio/c in", "staging/istio/a aside",
                      "staging/kustomization.yaml aside", "staging/kustomization.yaml in", "prod/istio/b aside",
                      "prod/istio/b in", "prune qa"],
    ("mixed", False): ["exchange dev/kustomization.yaml", "rename staging in", "exchange prod (a symlink)", "prune qa"],
    ("mixed", True): ["dev/kustomization.yaml aside", "dev/kustomization.yaml in", "staging in", "prod (a symlink) aside",
                      "prod in", "prune qa"],
}


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("layout", ["plain", "mixed"])
def test_the_steps_counted_are_the_steps_made(tmp_path, monkeypatch, layout, fallback):
    out = _make(tmp_path, layout)
    steps = _Steps(monkeypatch, fallback)
    write_rendered(out, NEW, prune=True)
    assert steps.calls == len(STEPS[layout, fallback])
    assert sorted(p.name for p in out.iterdir()) == ["dev", "notes", "prod", "staging", "top.txt"]
    assert not (out / "prod").is_symlink() and (out / "prod/istio/b/y.yaml").read_bytes() == b"prod y2\n"


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("layout", ["plain", "mixed"])
def test_a_failure_at_any_step_leaves_rendered_exactly_as_it_was(tmp_path, monkeypatch, layout, fallback):
    for number, step in enumerate(STEPS[layout, fallback], start=1):  # first swap … last swap, prune
        root = tmp_path / str(number)
        out = _make(root, layout)
        before = _snapshot(root)
        with monkeypatch.context() as patch:
            _Steps(patch, fallback, fail={number})
            with pytest.raises(OSError) as raised:
                write_rendered(out, NEW, prune=True)
        assert type(raised.value) is OSError and raised.value.strerror == f"injected failure {number}", step
        assert _snapshot(root) == before, f"failing at step {number} ({step}) changed rendered/"


def test_a_failure_to_undo_an_exchange_is_reported_after_the_first_error(tmp_path, monkeypatch):
    out = _make(tmp_path, "plain")
    before = _snapshot(out)
    # 5: exchanging prod's istio/b fails; 6-8: staging's steps undone; 9: undoing dev's fails
    _Steps(monkeypatch, fallback=False, fail={5, 9})
    with pytest.raises(RollbackError) as raised:
        write_rendered(out, NEW, prune=True)
    error = raised.value
    assert isinstance(error, OSError) and error.errno == errno.EIO
    assert isinstance(error.__cause__, OSError) and error.__cause__.strerror == "injected failure 5"
    assert error.strerror.startswith("injected failure 5; putting back what was replaced failed too")
    kept = [p for p in out.iterdir() if p.name.startswith(".dev.new-")]
    assert len(kept) == 1 and f"{out / 'dev'}: injected failure 9, what it held before is in {kept[0]}" in error.strerror
    assert sorted(p.name for p in out.iterdir()) == sorted(["dev", "notes", "prod", "qa", "staging", "top.txt", kept[0].name])
    after = _snapshot(out)
    assert {rel: e for rel, e in after.items() if not rel.startswith(("dev", ".dev"))} == {
        rel: e for rel, e in before.items() if not rel.startswith("dev")}, "the others are exactly as they were"
    assert _files(out / "dev") == NEW["dev"], "dev is new"
    assert list(_files(kept[0]).values()) == [OLD["dev"]["kustomization.yaml"]], "and what it replaced is where the message says"


def test_a_failure_to_undo_a_rename_names_where_the_previous_file_is(tmp_path, monkeypatch):
    out = _make(tmp_path, "plain")
    # 8: moving prod's new istio/b in fails; 9 puts the old one back; 10 takes staging's new
    # kustomization.yaml out; 11, putting the old one back, fails too: it is missing
    _Steps(monkeypatch, fallback=True, fail={8, 11})
    with pytest.raises(RollbackError, match=r"^\[Errno 5\] injected failure 8; ") as raised:
        write_rendered(out, NEW, prune=True)
    aside = list((out / "staging").glob(".kustomization.yaml.old-*"))
    assert len(aside) == 1 and f"{out / 'staging'}: injected failure 11, what it held before is in " in raised.value.strerror
    assert str(aside[0]) in raised.value.strerror
    assert not os.path.lexists(out / "staging" / "kustomization.yaml")
    assert aside[0].read_bytes() == b"staging k\n"
    for env in ("dev", "prod", "qa"):
        assert _files(out / env) == OLD[env]
    assert not [p for p in out.iterdir() if p.name.startswith((".dev.", ".prod.", ".qa."))], "the rest is cleaned up"


def test_a_stale_environment_planted_as_a_symlink_is_pruned_as_a_link(tmp_path):
    out = _make(tmp_path, "plain")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kustomization.yaml").write_bytes(b"not ours\n")
    (out / "evil").symlink_to(tmp_path / "elsewhere")
    write_rendered(out, NEW, prune=True)
    assert not os.path.lexists(out / "evil")
    assert (tmp_path / "elsewhere" / "kustomization.yaml").read_bytes() == b"not ours\n"
    assert sorted(p.name for p in out.iterdir()) == ["dev", "notes", "prod", "staging", "top.txt"]


def _meshc(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


@pytest.mark.parametrize("fail", [{2}, {2, 3}], ids=["swap fails", "its undo fails too"])
def test_compile_reports_a_failed_swap_exits_1_and_leaves_rendered_as_it_was(example_repo, monkeypatch, fail):
    out = example_repo / "rendered"
    code, err = _meshc("compile", "--repo", str(example_repo))
    assert code == 0, err
    reviews = example_repo / "policies/bookinfo/reviews.yaml"
    reviews.write_text(reviews.read_text().replace("timeout: 4s", "timeout: 3s"))
    before = _snapshot(out)
    _Steps(monkeypatch, fallback=False, fail=fail)
    code, err = _meshc("compile", "--repo", str(example_repo))
    assert code == 1
    assert err.startswith(f"meshc: error: cannot write {out}: injected failure 2"), err
    if fail == {2}:
        assert _snapshot(out) == before
    else:
        assert "putting back what was replaced failed too" in err and "injected failure 3" in err
