"""Ctrl-C in ``bench/twin_speed.py``: one line, exit 130, no traceback, no process left.

Several cases run one process each; a terminal's Ctrl-C reaches them too. Before, the case's
process printed a KeyboardInterrupt traceback of its own and the script another one (exit by
SIGINT, not 130).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _sigint_as_by_default() -> None:
    """A job runner may start the tests with SIGINT ignored; a terminal gives the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize(
    ("only", "processes"),
    [("heavy-320,saturated", 2), ("heavy-320", 1)],
    ids=["a process per case", "one case in the script's process"],
)
def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path, only: str, processes: int) -> None:
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "twin_speed.py"), "--only", only],
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal's job
            preexec_fn=_sigint_as_by_default,
        )
    try:
        deadline = time.monotonic() + 120.0  # a hang guard, not a timed assertion

        def started() -> bool:  # the header printed, and the case's process running if any
            header = "x real (engine)" in out_path.read_text()
            return header and (processes == 1 or bool(_children(proc.pid)))

        while not started() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # still running
        assert started(), err_path.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the script and its case's process
        code = proc.wait(timeout=60)  # a hang guard
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err_text = err_path.read_text()
    assert code == 130, err_text
    assert err_text == "twin_speed.py: interrupted\n"
    assert "heavy-320 " not in out_path.read_text()  # the case did not finish
    with pytest.raises(ProcessLookupError):  # no process left running in the group
        os.killpg(proc.pid, 0)
