"""Golden cases: a folder with an input repo and what meshc must make of it.

`tests/golden/<case>/` holds `policies/` and `environments/` (the input),
`expected.txt` (exit code and every diagnostic line, as the CLI prints them)
and, when the case compiles, `expected/` (the whole rendered tree).
`UPDATE_GOLDEN=1` rewrites the expectations; read the diff before committing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

from compiler.cli import main

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def cases(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "environments").is_dir())


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def diagnostics_only(stderr: str) -> str:
    """Drop meshc's own summary lines (they name temporary paths); keep diagnostics."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("meshc: "))


def read_tree(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_case(case_dir: Path, out: Path) -> None:
    code, stderr = run_cli(["compile", "--repo", str(case_dir), "--out", str(out), "--no-cache"])
    actual_text = f"exit: {code}\n{diagnostics_only(stderr)}"
    actual_tree = read_tree(out) if code == 0 else {}
    expected_txt, expected_dir = case_dir / "expected.txt", case_dir / "expected"
    if UPDATE:
        expected_txt.write_text(actual_text)
        shutil.rmtree(expected_dir, ignore_errors=True)
        for rel, content in actual_tree.items():
            (expected_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (expected_dir / rel).write_bytes(content)
        return
    assert actual_text == expected_txt.read_text(), f"diagnostics of {case_dir.name} changed"
    expected_tree = read_tree(expected_dir)
    assert sorted(actual_tree) == sorted(expected_tree), f"files of {case_dir.name} changed"
    for rel in expected_tree:
        assert actual_tree[rel].decode() == expected_tree[rel].decode(), f"{case_dir.name}: {rel} changed"
