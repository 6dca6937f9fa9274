"""write_rendered replaces rendered/ all-or-nothing: a failure at any step of the swap puts it back."""

from __future__ import annotations

import pytest

from compiler import emit


def test_an_exchange_that_fails_says_why_rather_than_falling_back(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError):  # not False, which would send write_rendered down the two-rename path
        emit._exchange(str(tmp_path / "missing"), tmp_path / "b")
    assert (tmp_path / "b").is_dir()
