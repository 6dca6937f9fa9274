"""Shared fixtures: where the repo, the examples and the shared schemas are."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GOLDEN = REPO / "tests" / "golden"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def example_repo(tmp_path: Path) -> Path:
    """A private copy of the example policy repo (policies, environments, rendered)."""
    dst = tmp_path / "repo"
    for part in ("policies", "environments", "rendered"):
        if (REPO / part).exists():
            shutil.copytree(REPO / part, dst / part)
    return dst
