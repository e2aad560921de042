"""How the ``loragate`` CLI fails: output into a pipe closed early ends quietly (as Unix tools
do), and the ``twin`` subcommands report bad input in one plain line (JSON with ``--json``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loragate.cli import EXIT_BROKEN_PIPE, main


def _run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``loragate ARGS`` with stdout a pipe whose reader is gone (``... | head`` once
    ``head`` has exited): every write to it fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "loragate.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_exits_quietly() -> None:
    done = _run_into_closed_pipe("twin", "profiles")
    assert done.returncode == EXIT_BROKEN_PIPE == 141
    assert done.stderr == b""  # no BrokenPipeError traceback, no "Exception ignored" either


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_pipe_in_process_returns_141(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["twin", "profiles"]) == EXIT_BROKEN_PIPE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["twin", "calibrate", "--data", "{tmp}/nonexistent", "--model", "m",
             "--out", "{tmp}/p.yaml"],
            "loragate twin calibrate: calibration folder not found: {tmp}/nonexistent",
        ),
        (
            ["twin", "validate", "--real-runs", "{tmp}/none.csv"],
            "loragate twin validate: real_runs: runs file not found: {tmp}/none.csv",
        ),
    ],
    ids=["calibrate", "validate"],
)  # fmt: skip
def test_twin_errors_are_one_plain_line_or_json_with_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    message = message.format(tmp=tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == message + "\n"
    # With --json: one JSON object, for scripts.
    assert main([*argv, "--json"]) == 2
    err = json.loads(capsys.readouterr().err)["error"]
    assert err["message"] == message.split(": ", 1)[1]
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("command", ["calibrate", "validate"])
def test_an_out_path_that_cannot_be_written_is_one_plain_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """``--out`` under a regular file (no directory can be made there): one line naming the
    path, exit 2; ``validate`` says so before replaying anything."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "result.out"
    if command == "calibrate":
        data = Path(__file__).resolve().parents[1] / "data" / "tiny-llama-cpu" / "calibration"
        argv = ["twin", "calibrate", "--data", str(data), "--model", "tiny-llama-cpu"]
    else:
        argv = ["twin", "validate", "--real-runs", str(tmp_path / "none.csv")]
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"loragate twin {command}: --out: cannot write {out}: ")
    assert str(blocker) in captured.err.split(f"{out}: ", 1)[1]  # says what is in the way
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
