"""The simulation benches check their deployment before any run: a bad --workload, --profile or
engine setting is one line and exit 2 (it was a ConfigError traceback from a worker, after the
capacity search had run)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import compare_policies_sim
import routing_bounds

MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "compare_policies_sim.py": compare_policies_sim.main,
    "routing_bounds.py": routing_bounds.main,
}


@pytest.mark.parametrize("script", sorted(MAINS))
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--workload", "TMP/none.yaml"], "cannot read workload spec TMP/none.yaml"),
        (["--replicas", "0"], "replicas: must be >= 1"),
        (["--max-loras", "0"], "max_loras: must be >= 1"),
    ],
)
def test_a_bad_deployment_is_one_line_before_any_run(
    script: str,
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    assert MAINS[script]([*args, "--seeds", "1", "--duration-s", "10"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no capacity probe, no table
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{script}: error: ")
    assert message.replace("TMP", str(tmp_path)) in lines[0]
