"""The repository stands on its own: a fresh clone has nothing beside it.

`.ci/run` proves it by running `make test` in a clone in an empty folder;
this test catches the usual way it breaks earlier, on any machine: a tracked
file that reads from outside the repository.
"""

from __future__ import annotations

import re
import subprocess

from conftest import REPO, SCHEMAS

# A path that climbs out of the repository to a sibling, as a string a program would open.
_OUTSIDE = re.compile(r"\.\./shared\b|parents?\s*(\[\d\])?\s*/\s*[\"']shared[\"']")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_tracked_program_reads_outside_the_repository():
    offenders = []
    for rel in _tracked():
        if rel.endswith(".md") or rel.startswith(("tests/golden/", "rendered/", "bench/")):
            continue  # prose may say where a file came from; generated output reads nothing; the
            # benchmarks may compare against a peer a developer started by hand
        path = REPO / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1)
                      if _OUTSIDE.search(line) and not line.lstrip().startswith("#")
                      and rel != "tests/test_self_contained.py"]
    assert offenders == []


def test_the_schemas_are_vendored_with_their_sources():
    readme = (SCHEMAS / "README.md").read_text()
    for name in ("istio-crds.yaml", "k8s-service-v1.json"):
        assert (SCHEMAS / name).is_file()
        assert name in readme  # where it came from, which version, its hash


def test_ci_runs_the_readme_test_command_in_a_clone_with_nothing_beside_it():
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
    assert re.search(r"^git clone .*\"\$scratch/meshc\"$", ci, re.M)
    assert ci.rstrip().endswith("make test")
