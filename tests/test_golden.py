"""Every golden case under tests/golden/ compiles to exactly its expectation."""

from __future__ import annotations

import pytest

from conftest import GOLDEN
from golden import cases, check_case


@pytest.mark.parametrize("case", cases(GOLDEN))
def test_golden(case: str, tmp_path):
    check_case(GOLDEN / case, tmp_path / "rendered")
