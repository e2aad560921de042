"""Ctrl-C in ``bench/compare_policies_sim.py``: the queued simulations are cancelled, the
workers stopped, one line, exit 130 (it waited for every queued run of the current batch, then
printed a KeyboardInterrupt traceback, and each worker one of its own)."""

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


def test_ctrl_c_in_the_capacity_search_stops_at_once(tmp_path: Path) -> None:
    out_path = tmp_path / "stdout.txt"
    with out_path.open("w") as out, (tmp_path / "stderr.txt").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "compare_policies_sim.py"), "--seeds", "2",
             "--jobs", "2"],
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, the workers in it: a terminal's
            preexec_fn=_sigint_as_by_default,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120.0
        while "capacity probe" not in out_path.read_text() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)  # still searching
        assert "capacity probe" in out_path.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the script and its workers
        code = proc.wait(timeout=60)  # a hang guard
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err_text = (tmp_path / "stderr.txt").read_text()
    assert code == 130, err_text
    assert err_text == "compare_policies_sim.py: interrupted\n"
    with pytest.raises(ProcessLookupError):  # no worker left running in the group
        os.killpg(proc.pid, 0)
