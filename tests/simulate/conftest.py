"""Fixtures of the simulate tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_spec import SPEC


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """``tiny_spec.SPEC`` in a file."""
    p = tmp_path / "tiny.yaml"
    p.write_text(SPEC)
    return p
