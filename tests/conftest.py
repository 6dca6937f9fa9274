"""Shared fixtures: where the repo, the examples and the vendored schemas are."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "tests" / "schemas"  # vendored: a fresh clone has nothing beside it
GOLDEN = REPO / "tests" / "golden"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """meshc's re-compile cache (normally ~/.cache/meshc) goes to a temporary directory,
    for this process and the meshc subprocesses tests start."""
    os.environ["MESHC_CACHE_DIR"] = str(tmp_path_factory.mktemp("meshc-cache"))


@pytest.fixture
def example_repo(tmp_path: Path) -> Path:
    """A private copy of the example policy repo (policies, environments, rendered)."""
    dst = tmp_path / "repo"
    for part in ("policies", "environments", "rendered"):
        if (REPO / part).exists():
            shutil.copytree(REPO / part, dst / part)
    return dst
