"""Ctrl-C in ``bench/twin_speed.py``: one line, exit 130, no traceback, no process left.

Several cases run one process each; a terminal's Ctrl-C reaches them too. Before, the case's
process printed a KeyboardInterrupt traceback of its own and the script another one (exit by
SIGINT, not 130). A Ctrl-C while the script starts a case's process (forked, not yet exec'd)
left that process running on, ignoring Ctrl-C, after the script's exit 130 (seen under load).
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
        left = _kill_group(proc)
    err_text = err_path.read_text()
    assert code == 130, err_text
    assert err_text == "twin_speed.py: interrupted\n"
    assert "heavy-320 " not in out_path.read_text()  # the case did not finish
    assert not left  # no process left running in the group


def _kill_group(proc: subprocess.Popen[bytes]) -> bool:
    """Whether any process of ``proc``'s group was left running (the script reaped first);
    kills them all either way, so that no case process outlives the test."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


# twin_speed.py, its case processes' fork->exec window held open until the Ctrl-C was sent:
# the preexec_fn (ignore_sigint) waits for the marker file the test creates after it.
_HELD = """
import runpy, sys, time
from pathlib import Path
import loragate.core.process_pool as pool
marker, ignore = Path(sys.argv[1]), pool.ignore_sigint
def held():
    ignore()
    deadline = time.monotonic() + 60.0
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
pool.ignore_sigint = held
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ctrl_c_while_a_case_process_starts_leaves_none_running(tmp_path: Path) -> None:
    out_path, err_path, marker = tmp_path / "stdout.txt", tmp_path / "stderr.txt", tmp_path / "sent"
    script = BENCH / "twin_speed.py"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _HELD,
                str(marker),
                str(script),
                "--only",
                "heavy-320,saturated",
            ],
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_sigint_as_by_default,
        )
    try:
        deadline = time.monotonic() + 120.0  # a hang guard, not a timed assertion
        while not _children(proc.pid) and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)  # still running
        assert _children(proc.pid), err_path.read_text()  # forked, held before its exec
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C while the script is in Popen
        marker.touch()
        code = proc.wait(timeout=60)  # a hang guard
    finally:
        left = _kill_group(proc)
    err_text = err_path.read_text()
    assert code == 130, err_text
    assert err_text == "twin_speed.py: interrupted\n"
    assert not left  # the case's process was killed, not left to run its hour
