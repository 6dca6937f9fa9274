"""Discovery walks the input directories as os.walk would (sorted, hidden names left out,
symlinked directories not entered), one scandir per directory."""

from __future__ import annotations

import os

from compiler import load


def _reference(root: str, top: str) -> list[tuple[str, bool]]:
    """The walk as it was written on os.walk."""
    start = os.path.join(root, top)
    if not os.path.isdir(start):
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in sorted(filenames):
            if not name.startswith("."):
                out.append((f"{rel_dir}/{name}", os.path.islink(os.path.join(dirpath, name))))
    return out


def test_the_walk_finds_what_os_walk_finds(tmp_path):
    root = tmp_path / "repo"
    top = root / "policies"
    for d in ("b", "a", "a/z", "a/.hidden", ".git", "c/d/e"):
        (top / d).mkdir(parents=True, exist_ok=True)
    for f in ("b/x.yaml", "a/y.yaml", "a/B.yaml", "a/z/w.yaml", "a/.hidden/h.yaml", ".git/g.yaml", ".dot.yaml",
              "c/d/e/deep.yaml", "top.yaml", "notes.txt"):
        (top / f).write_text(f)
    (top / "a" / "link.yaml").symlink_to(top / "b" / "x.yaml")
    (top / "a" / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (top / "a" / "dirlink").symlink_to(top / "c")  # a directory behind a link: not entered, not a file
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.yaml").write_text("o")
    (top / "b" / "out").symlink_to(outside)
    os.mkfifo(top / "b" / "fifo.yaml")
    walked = list(load._walk(str(root), "policies"))
    assert walked == _reference(str(root), "policies")
    assert ("policies/a/link.yaml", True) in walked and ("policies/c/d/e/deep.yaml", False) in walked
    assert list(load._walk(str(root), "environments")) == []
