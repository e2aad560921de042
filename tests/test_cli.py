from __future__ import annotations

import subprocess
import sys

import pytest

from loragate.cli import main


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "loragate" in capsys.readouterr().out


def test_console_script_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "usage: loragate" in out
