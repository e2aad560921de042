"""What a new user meets first: one-line errors instead of tracebacks, and help that says enough."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.twin.validate_workload import DEFAULT_REPLAYS

REPO = Path(__file__).resolve().parents[1]


def _loragate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loragate.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--policy", "lorgate"], "unknown policy 'lorgate'"),
        (["--profile", "nosuch"], "unknown profile 'nosuch'"),
        (["--workload", "no/such/spec.yaml"], "no/such/spec.yaml"),
        (["--max-loras", "0"], "max_loras"),
    ],
)
def test_demo_with_a_bad_setting_fails_with_one_line(flags: list[str], named: str) -> None:
    done = _loragate("demo", "--duration", "1", "--no-progress", "--replicas", "1", *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("loragate demo: ")
    assert named in lines[0]


def test_twin_profiles_prints_every_description_whole(capsys: pytest.CaptureFixture[str]) -> None:
    from loragate.twin.profile import list_profiles, load_profile

    assert main(["twin", "profiles"]) == 0
    out = capsys.readouterr().out
    printed = " ".join(out.split())
    for name in list_profiles():
        description = " ".join(load_profile(name).description.split())
        assert f"{name} {description}" in printed  # not cut at a fixed width
    assert max(len(line) for line in out.splitlines()) <= 100


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["replica"], ["(default: fast)", "adapters per batch / GPU slots (default: 1)"]),
        (["simulate"], ["(default: round_robin)", "(default: fast)"]),
        (["demo"], ["GPU LoRA slots per replica (2)", "CPU LoRA cache per replica (4)"]),
        (
            ["twin", "validate"],
            [
                f"SEED*REPLAYS+k; default: {DEFAULT_REPLAYS})",
                "replayed window in seconds (default: 3600.0)",
            ],
        ),
    ],
)
def test_help_names_the_defaults_a_user_runs_with(
    command: list[str], shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in shown:
        assert phrase in text


def _sigint_as_by_default() -> None:
    """In the child before it runs: a job runner may start the tests with SIGINT ignored,
    which the child would inherit (Python then installs no KeyboardInterrupt handler and the
    Ctrl-C below would do nothing); a terminal gives the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupted(
    args: list[str],
    started: Callable[[], bool],
    after_s: float = 4.0,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run ``loragate ARGS`` in its own process, press Ctrl-C (SIGINT) after ``after_s``, and
    not before ``started()`` says the run is under way (up to 60 s: on a busy machine the
    imports alone can take seconds): the exit status and stderr. Its own process, because a
    signal sent to the test process would meet whatever handler an earlier test's event loop
    left installed there."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loragate.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_by_default,
        env=env,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=after_s)  # still running: the signal lands inside the run
        deadline = time.monotonic() + 60.0
        while not started() and time.monotonic() < deadline:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_ctrl_c_stops_the_demo_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C during `make demo`: the replicas and the gateway are closed, no traceback. The
    run is under way once its adapter folders are written (in its temporary folder, under
    TMPDIR): a fixed wait let the Ctrl-C land during the imports on a busy machine."""
    code, err = _interrupted(
        ["demo", "--duration", "60", "--no-progress", "--replicas", "1"],
        started=lambda: any(tmp_path.glob("loragate-demo-*/*")),
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "loragate demo: interrupted"
    assert "Traceback" not in err


# Run as the child of the test below: Ctrl-C (a real SIGINT to itself) while the command's
# modules are imported, as a user's Ctrl-C lands on a busy machine before the demo starts.
_CTRL_C_DURING_IMPORT = """
import os, signal, sys
from importlib.abc import MetaPathFinder

class CtrlC(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "loragate.gateway":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
from loragate.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_demo_is_imported_is_one_line() -> None:
    """Before, a Ctrl-C during the imports (seconds on a busy host) printed their traceback."""
    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_DURING_IMPORT, "demo", "--duration", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_sigint_as_by_default,
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == "loragate demo: interrupted\n"


def test_ctrl_c_stops_a_simulation_with_one_line(tmp_path: Path) -> None:
    """Ctrl-C in the README's hour-long `loragate simulate` run: one line, exit 130."""
    out = tmp_path / "run"
    code, err = _interrupted(
        ["simulate", "--workload", str(REPO / "workload" / "zipf-200.yaml"), "--replicas", "4",
         "--profile", "llama-3.1-8b-h100", "--policy", "loragate", "--out", str(out)],
        started=(out / "records.csv").exists,
    )  # fmt: skip
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (
        f"loragate simulate: interrupted ({out}/records.csv is incomplete)"
    )
    assert "Traceback" not in err
    assert not (out / "summary.json").exists()


def test_simulate_text_summary_says_none_starved_plainly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = str(REPO / "workload" / "demo.yaml")
    assert main(["simulate", "--workload", spec, "--replicas", "2", "--duration-s", "20"]) == 0
    out = capsys.readouterr().out
    assert "starved requests (first token after > 60 s, or never): none" in out
    assert "of 0 adapters" not in out


def test_simulate_names_a_misspelt_workload_key_first_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new user's `adaptrs:` was reported as "duration_s: is required", then "arrivals: is
    required": the misspelling came last, and no error gave a line."""
    spec = tmp_path / "w.yaml"
    spec.write_text("seed: 1\nadaptrs:\n  count: 4\n")
    assert main(["simulate", "--workload", str(spec), "--replicas", "1"]) == 2
    assert capsys.readouterr().err == (
        f"loragate simulate: error: {spec}:2:1: adaptrs: unknown key "
        "(is 'adaptrs' a misspelling of 'adapters'?)\n"
    )
    spec.write_text(
        "duration_s: 5\nadapters: {count: 2}\narrivals:\n  process: gamma\n  cv: high\n"
        "  rate_rps: 2\n"
    )
    assert main(["simulate", "--workload", str(spec), "--replicas", "1"]) == 2
    assert capsys.readouterr().err == (
        f"loragate simulate: error: {spec}:5:3: arrivals.cv: expected a number, got 'high'\n"
    )


def test_serve_names_a_bad_config_key_with_its_line_in_one_line(tmp_path: Path) -> None:
    """From the shell: a misspelt gateway config key gets the line and the nearest key, as a
    workload's does; YAML nested too deep is one line too (PyYAML's RecursionError printed a
    traceback of ~3,000 lines)."""
    config = tmp_path / "gw.yaml"
    config.write_text("base_model: m\nreplicas: ['http://127.0.0.1:9']\nlimts: {}\n")
    done = _loragate("serve", "--config", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("loragate serve: ")
    assert f"{config}:3:1: limts: unknown key (is 'limts' a misspelling of 'limits'?)\n" in (
        done.stderr
    )
    config.write_text("base_model: m\nreplicas: " + "[" * 5000 + "]" * 5000 + "\n")
    done = _loragate("serve", "--config", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{config}:2:110: nested more than 100 levels deep" in done.stderr
