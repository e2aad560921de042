"""``loragate COMMAND ...`` imports that command's module only: ``loragate loadtest`` spent ~0.8 s
of its start-up importing the simulator, the gateway and the demo it does not use (every command
module was imported to build the parser). ``loragate --help`` and an unknown command still see
every command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loragate.cli import main

# Runs main(ARGV) in a fresh interpreter; its last line on stderr: the loragate modules imported.
PROBE = """\
import sys
from loragate.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(m for m in sys.modules if m.startswith("loragate."))), file=sys.stderr)
"""


def imported(*argv: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    return set(done.stderr.splitlines()[-1].split())


def test_a_command_imports_its_own_module_only() -> None:
    modules = imported("loadtest", "--help")
    assert "loragate.commands.loadtest" in modules
    assert {"loragate.commands.demo", "loragate.commands.serve"}.isdisjoint(modules)
    assert not any(m.startswith(("loragate.gateway", "loragate.simulate")) for m in modules)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("replica", "serve", "demo", "twin", "simulate", "loadtest", "policies"):
        assert name in out


def test_an_unknown_command_is_told_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["loadtst"])
    assert exit_.value.code == 2
    assert "invalid choice: 'loadtst'" in capsys.readouterr().err
