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


def test_python_dash_m_loragate_runs_the_cli() -> None:
    """``python -m loragate`` is the ``loragate`` command (no ``__main__`` module before)."""
    from loragate import __version__

    done = subprocess.run(
        [sys.executable, "-m", "loragate", "--version"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"loragate {__version__}"
    usage = subprocess.run(
        [sys.executable, "-m", "loragate", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "usage: loragate" in usage and "serve" in usage
