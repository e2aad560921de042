"""The benches check their arguments before any work: a bad one is one line and exit 2 (the
simulation benches raised a ConfigError traceback from a worker, after the capacity search had
run; routing_cost.py a traceback from its first measurement; twin_speed.py one per case, or
nothing at all for an unknown --only; gateway_overhead.py a traceback after waiting 30 s for a
gateway that could not start; the Redis benches a traceback from the store for a bad --url)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import _redis_server
import calibrate_vllm_cpu
import compare_policies_sim
import gateway_overhead
import routing_bounds
import routing_cost
from ports import unused_port
from redis_fixture import RedisServer

BENCH = Path(__file__).resolve().parents[2] / "bench"

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "loragate,lorgate"], "--policies: unknown policy 'lorgate'; known: "),
        (["--policies", ","], "--policies: names no policy"),
        (["--replicas", "0"], "--replicas: must be >= 1 (got 0)"),
        (["--decisions-per-poll", "0"], "--decisions-per-poll: must be >= 1 (got 0)"),
    ],
)
def test_routing_cost_checks_its_arguments_first(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert routing_cost.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no header, no measurement
    assert captured.err.startswith(f"routing_cost.py: error: {message}")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "nope"], "unknown profile 'nope'"),
        (["--only", "low,nope"], "--only: unknown case(s) nope; known: low, "),
        (["--hours", "0"], "--hours: must be a positive number (got 0)"),
    ],
)
def test_twin_speed_checks_its_arguments_first(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "twin_speed.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # not even the header (or, for --only nope, only the header)
    assert done.stderr.startswith("twin_speed.py: error: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "loragate,lorgate"], "--policies: unknown policy lorgate (known: "),
        (["--policies", ","], "--policies names no policy"),
        (["--replicas", "0"], "--replicas must be >= 1 (got 0)"),
        (["--src", "TMP"], "no loragate package in TMP"),
        (["--extra-src", "TMP"], "--extra-src takes LABEL=SRC_DIR"),
    ],
)
def test_gateway_overhead_checks_its_arguments_before_starting_a_gateway(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as done:
        gateway_overhead.parse_args(args)
    assert done.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]  # argparse's: after its usage lines
    assert f": error: {message.replace('TMP', str(tmp_path))}" in last


def test_calibrate_vllm_cpu_refuses_an_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """It ran no scenario and said 'done' (before checking that a vLLM environment exists)."""
    with pytest.raises(SystemExit) as done:
        calibrate_vllm_cpu.main(["--parts", "validation", "--scenarios", "v1_deferral_4ad,nope"])
    assert done.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert ": error: unknown scenario(s) ['nope']; choose from ['v1_deferral_4ad', " in last


@pytest.mark.parametrize("script", ["state_roundtrips.py", "gateway_state_roundtrips.py"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "redis://127.0.0.1:PORT/0"], "--url redis://127.0.0.1:PORT/0: no Redis answers"),
        (["--url", "127.0.0.1:6379"], "--url 127.0.0.1:6379: Redis URL must specify one of"),
        (["--requests", "0"], "--requests must be >= 1 (got 0)"),
    ],
)
def test_the_redis_benches_check_url_and_counts_first(
    script: str, args: list[str], message: str
) -> None:
    """They raised a traceback from the store, or (the gateway one) ran on without Redis."""
    port = str(unused_port())
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *(a.replace("PORT", port) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        f"{script}: error: {message.replace('PORT', port)}"
    )


def test_a_redis_that_answers_is_no_problem(redis_server: RedisServer) -> None:
    assert _redis_server.redis_url_problem(redis_server.url) is None
