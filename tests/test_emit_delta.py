"""write_rendered on an environment that exists changes only what differs, a directory at a time.

Real directories throughout. What a re-write does is read from the tree itself
(inodes: an entry that was swapped has a new one, a file linked from the old
tree keeps its own) and from counting the files it writes and the renames and
exchanges it makes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from compiler import emit
from compiler.emit import write_rendered


def _tree(namespaces: int = 3, services: int = 4) -> dict[str, bytes]:
    files = {"kustomization.yaml": b"resources: [...]\n"}
    for n in range(namespaces):
        for s in range(services):
            files[f"istio/ns-{n}/svc-{s}.yaml"] = f"ns {n} svc {s}\n".encode()
    for kind in ("clusters", "endpoints", "listeners", "routes"):
        files[f"envoy/{kind}.json"] = f'{{"{kind}": 1}}\n'.encode()
    return files


def _inodes(root: Path) -> dict[str, int]:
    """Every entry below `root` (never following a link) → its inode."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.lstat(path).st_ino
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


class _Counted:
    """Counts the files write_rendered writes, and its renames and exchanges."""

    def __init__(self, monkeypatch):
        self.written: list[bytes] = []  # what each file written holds
        self.swaps = 0
        real_write, real_exchange, real_rename = emit._write, emit._exchange, os.rename

        def write(name, content, dir_fd):
            self.written.append(content)
            return real_write(name, content, dir_fd)

        def exchange(a, b):
            self.swaps += 1
            return real_exchange(a, b)

        def rename(a, b):
            self.swaps += 1
            return real_rename(a, b)

        monkeypatch.setattr(emit, "_write", write)
        monkeypatch.setattr(emit, "_exchange", exchange)
        monkeypatch.setattr(os, "rename", rename)


def test_nothing_changed_writes_and_swaps_nothing(tmp_path, monkeypatch):
    out = tmp_path / "rendered"
    write_rendered(out, {"prod": _tree()})
    before = _inodes(out)
    counted = _Counted(monkeypatch)
    write_rendered(out, {"prod": _tree()}, prune=True)
    assert counted.written == [] and counted.swaps == 0
    assert _inodes(out) == before


def test_one_changed_file_replaces_its_directory_only(tmp_path, monkeypatch):
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files})
    before = _inodes(out / "prod")
    counted = _Counted(monkeypatch)
    changed = {**files, "istio/ns-1/svc-2.yaml": b"changed\n"}
    write_rendered(out, {"prod": changed})
    after = _inodes(out / "prod")
    assert _files(out / "prod") == changed
    assert counted.written == [b"changed\n"] and counted.swaps == 1
    assert after["istio/ns-1"] != before["istio/ns-1"], "the directory holding the change is a new one"
    assert after["istio/ns-1/svc-2.yaml"] != before["istio/ns-1/svc-2.yaml"]
    # ... whose unchanged files are the old files, linked; everything else is untouched
    assert {k: v for k, v in after.items() if k not in ("istio/ns-1", "istio/ns-1/svc-2.yaml")} == {
        k: v for k, v in before.items() if k not in ("istio/ns-1", "istio/ns-1/svc-2.yaml")}
    assert all(os.lstat(out / "prod" / rel).st_nlink == 1 for rel in changed), "the replaced directory is gone"
    assert sorted(p.name for p in out.iterdir()) == ["prod"], "nothing left beside it"


def test_a_reader_holding_a_directory_sees_one_compile_of_it(tmp_path, monkeypatch):
    """`meshc serve` reads the four Envoy files through one handle on envoy/: a change to one
    of them swaps the whole directory, so a handle opened before the swap reads the previous
    compile's four files, and one opened after it the new compile's, never a mix."""
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files})
    changed = {**files, "envoy/routes.json": b'{"routes": 2}\n', "envoy/clusters.json": b'{"clusters": 2}\n'}
    envoy = lambda tree: {k.removeprefix("envoy/"): v for k, v in tree.items() if k.startswith("envoy/")}
    held = os.open(out / "prod" / "envoy", os.O_RDONLY | os.O_DIRECTORY)
    seen: list = []
    real_discard = emit._discard

    def read_then_discard(path):  # the swaps are done; what they replaced is not deleted yet
        if not seen:
            seen.append(_read_through(held))
            seen.append(_read_through(os.open(out / "prod" / "envoy", os.O_RDONLY | os.O_DIRECTORY)))
        real_discard(path)

    monkeypatch.setattr(emit, "_discard", read_then_discard)
    write_rendered(out, {"prod": changed})
    assert seen == [envoy(files), envoy(changed)]


def _read_through(directory: int) -> dict[str, bytes]:
    out = {}
    try:
        for kind in ("clusters", "endpoints", "listeners", "routes"):
            with open(os.open(f"{kind}.json", os.O_RDONLY, dir_fd=directory), "rb") as f:
                out[f"{kind}.json"] = f.read()
    finally:
        os.close(directory)
    return out


def test_a_changed_file_beside_directories_is_swapped_alone(tmp_path, monkeypatch):
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files})
    before = _inodes(out)
    counted = _Counted(monkeypatch)
    changed = {**files, "kustomization.yaml": b"resources: [changed]\n"}
    write_rendered(out, {"prod": changed})
    after = _inodes(out)
    assert counted.written == [b"resources: [changed]\n"] and counted.swaps == 1
    assert after["prod"] == before["prod"] and after["prod/istio"] == before["prod/istio"]
    assert {k for k in after if after[k] != before[k]} == {"prod/kustomization.yaml"}
    assert _files(out / "prod") == changed


def test_directories_come_and_go_with_the_services_in_them(tmp_path):
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files})
    before = _inodes(out / "prod")
    changed = {k: v for k, v in files.items() if not k.startswith("istio/ns-0/")}
    changed["istio/ns-9/new.yaml"] = b"new\n"
    changed["istio/ns-9/deeper/still.yaml"] = b"deeper\n"
    write_rendered(out, {"prod": changed})
    assert _files(out / "prod") == changed
    after = _inodes(out / "prod")
    assert "istio/ns-0" not in after
    assert after["istio/ns-1"] == before["istio/ns-1"] and after["istio"] == before["istio"]
    assert oct(stat.S_IMODE(os.lstat(out / "prod" / "istio/ns-9/deeper").st_mode)) == "0o755"


def test_whatever_was_planted_is_replaced_and_never_followed(tmp_path):
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "svc-0.yaml").write_bytes(files["istio/ns-0/svc-0.yaml"])
    prod = out / "prod"
    (prod / "istio/ns-0/svc-0.yaml").unlink()
    (prod / "istio/ns-0/svc-0.yaml").symlink_to(outside / "svc-0.yaml")  # a link to the right bytes
    os.mkfifo(prod / "istio/ns-1/svc-0.yaml.fifo")  # something extra, that would block a read
    (prod / "istio/ns-2/svc-1.yaml").unlink()
    (prod / "istio/ns-2/svc-1.yaml").mkdir()  # a directory where a file belongs
    (prod / "envoy/stray").mkdir()
    os.chmod(prod / "istio/ns-2", 0o700)
    (prod / "notes.txt").write_bytes(b"not produced\n")
    write_rendered(out, {"prod": files})
    assert _files(prod) == files
    assert not any(p.is_symlink() or stat.S_ISFIFO(os.lstat(p).st_mode) for p in prod.rglob("*"))
    assert (outside / "svc-0.yaml").stat().st_nlink == 1, "nothing outside was linked in"
    assert {oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in [prod, *prod.rglob("*")] if p.is_dir()} == {"0o755"}


def test_a_failure_while_staging_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "rendered"
    files = _tree()
    write_rendered(out, {"prod": files, "dev": files})
    before = _inodes(out)
    real_write = emit._write

    def failing(name, content, dir_fd):
        if content == b"fails\n":
            raise OSError(28, "No space left on device")
        return real_write(name, content, dir_fd)

    monkeypatch.setattr(emit, "_write", failing)
    with pytest.raises(OSError, match="No space left"):
        write_rendered(out, {"dev": {**files, "istio/ns-0/svc-0.yaml": b"fine\n"},
                             "prod": {**files, "istio/ns-1/svc-0.yaml": b"fails\n"}})
    assert _inodes(out) == before
    assert _files(out / "dev") == files and _files(out / "prod") == files


@pytest.mark.parametrize("chunk", [1, 7, 1 << 22], ids=["byte by byte", "in chunks", "at once"])
def test_a_file_is_the_same_only_if_every_byte_is(tmp_path, monkeypatch, chunk):
    """Old files are read in chunks into one buffer and compared where each chunk lands."""
    monkeypatch.setattr(emit, "_CHUNK", chunk)
    out = tmp_path / "rendered"
    base = {"kustomization.yaml": b"k\n", "envoy/a.json": b"0123456789abcdef\n", "envoy/b.json": b"",
            "istio/x/y.yaml": b"y" * 50 + b"\n"}
    write_rendered(out, {"prod": base})
    for rel, content in [("envoy/a.json", b"0123456789abcdef\n"), ("envoy/b.json", b"")]:
        before = os.lstat(out / "prod" / rel).st_ino
        write_rendered(out, {"prod": base})
        assert os.lstat(out / "prod" / rel).st_ino == before, f"{rel} is the same"
    for content in [b"0123456789abcdef", b"0123456789abcdef\n\n", b"0123456789abcdeF\n", b"x123456789abcdef\n", b""]:
        files = {**base, "envoy/a.json": content}
        write_rendered(out, {"prod": files})
        assert _files(out / "prod") == files, content
        write_rendered(out, {"prod": base})
        assert _files(out / "prod") == base
