"""Fixtures for the simulated-replica tests: adapter folders built in a temp dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.twin.adapters import write_adapter_folder

MakeAdapterDir = Callable[..., str]


def make_adapter_dir(
    root: Path, name: str, rank: int = 8, *, base_model_name_or_path: str | None = None
) -> str:
    """Create ``root/name`` as a minimal LoRA adapter folder and return its path."""
    return write_adapter_folder(
        str(root / name), rank=rank, base_model_name_or_path=base_model_name_or_path
    )


@pytest.fixture
def adapter_dir(tmp_path: Path) -> MakeAdapterDir:
    """``adapter_dir(name, rank=8, base_model_name_or_path=None) -> path`` under tmp_path."""

    def make(name: str, rank: int = 8, *, base_model_name_or_path: str | None = None) -> str:
        return make_adapter_dir(
            tmp_path / "loras", name, rank, base_model_name_or_path=base_model_name_or_path
        )

    return make
