"""``loragate simulate --rate-rps/--adapters`` and what its text summary says about the run:
slot-bound or throughput-starved, the cluster flag beside starved requests, the demo profile."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from tiny_spec import SPEC

from loragate.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert main(["simulate", *argv]) == 0
    got = capsys.readouterr()
    return got.out, got.err


def _summary(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    out, _ = _run(capsys, *argv, "--json")
    summary: dict[str, object] = json.loads(out)
    return summary


def _without_timing(summary: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in summary.items() if k not in ("wall_s", "speedup", "config")}


def test_rate_and_adapters_change_the_workload_and_are_recorded(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(capsys, "--workload", str(spec_file), "--replicas", "2", "--rate-rps", "25",
         "--adapters", "40", "--out", str(out))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["adapters"] == 40
    assert math.isclose(cfg["offered_rate_rps"], 25.0)
    assert cfg["workload_overrides"] == {
        "rate_rps": 25.0,
        "adapters": 40,
        "duration_s": None,
        "seed": None,
    }
    # 25 req/s for 20 s, over more than the spec's 6 adapters (Poisson: 500 +- 3 sigma).
    assert 430 < summary["requests"]["total"] < 570
    assert summary["adapters_per_replica"]["r0"] > 6


def test_overrides_equal_to_the_spec_change_nothing(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--workload", str(spec_file), "--replicas", "2", "--max-loras", "2"]
    plain = _summary(capsys, *argv)
    same = _summary(capsys, *argv, "--rate-rps", "10", "--adapters", "6")
    assert _without_timing(same) == _without_timing(plain)


@pytest.mark.parametrize(
    ("extra", "spec_text", "fragment"),
    [
        (["--rate-rps", "0"], SPEC, "--rate-rps: must be > 0, got 0"),
        (["--rate-rps", "nan"], SPEC, "--rate-rps: must be > 0, got nan"),
        (["--adapters", "0"], SPEC, "--adapters: must be in [1, 100000], got 0"),
        (
            ["--adapters", "3"],
            SPEC.replace(
                "adapters: {count: 6, ranks: {8: 0.5, 32: 0.5}, popularity: zipf}",
                "adapters: {items: [{name: a, rank: 8}, {name: b, rank: 8}]}",
            ),
            "--adapters: the spec lists its 2 adapters one by one (adapters.items)",
        ),
        (
            ["--adapters", "3"],
            SPEC.replace(
                "popularity: zipf", "popularity: {kind: explicit, weights: [1,1,1,1,1,2]}"
            ),
            "--adapters: the spec gives one popularity weight per adapter (6",
        ),
        (
            # The first digit of i names 6 adapters once each, not 12 (1, 10, 11).
            ["--adapters", "12"],
            SPEC.replace("popularity: zipf", 'popularity: zipf, name_pattern: "a{i!s:.1}"'),
            "--adapters: the spec's adapters.name_pattern: gives duplicate names for 12 adapters",
        ),
    ],
)
def test_overrides_the_spec_cannot_take_are_one_clear_error(
    tmp_path: Path,
    extra: list[str],
    spec_text: str,
    fragment: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "w.yaml"
    spec.write_text(spec_text)
    assert main(["simulate", "--workload", str(spec), "--replicas", "1", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loragate simulate: error: ")
    assert fragment in err
    assert err.count("\n") == 1


def _servegen_trace(path: Path) -> Path:
    """Three clients, two 600 s windows: 60, 40 and 20 requests a window."""
    lines = ["client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"]
    for cid, n in ((11, 60), (12, 40), (13, 20)):
        for w in range(2):
            lines.append(f"{cid},{w * 600},{n / 600},1.0,Gamma,1.0,{600 / n}\n")
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    return path


def test_a_trace_replay_says_what_the_overrides_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = _servegen_trace(tmp_path / "trace.csv.gz")
    spec = tmp_path / "sg.yaml"
    # time_scale 60: the two trace windows (1200 s) in 20 simulated seconds: 12 req/s in all.
    spec.write_text(
        "name: sg\nseed: 2\nduration_s: 20\nadapters: {count: 3, ranks: [8]}\n"
        f"arrivals:\n  process: servegen\n  servegen: {{file: {trace}, time_scale: 60}}\n"
        "lengths: {prompt: 32, output: 8}\n"
    )
    argv = ["--workload", str(spec), "--replicas", "1", "--profile", "llama-3.1-8b-h100", "--json"]
    out, err = _run(capsys, *argv)
    assert math.isclose(json.loads(out)["config"]["offered_rate_rps"], 12.0)
    assert "note" not in err
    # The two busiest clients, at their own rates (6 + 4 req/s).
    out, err = _run(capsys, *argv, "--adapters", "2")
    cfg = json.loads(out)["config"]
    assert (cfg["adapters"], cfg["offered_rate_rps"]) == (2, pytest.approx(10.0))
    assert "--adapters 2: replays the trace's 2 busiest clients, each at its traced rate " in err
    assert "(10 req/s in all; --rate-rps sets the total)" in err
    # And scaled to a total: every window's count by one factor.
    out, err = _run(capsys, *argv, "--adapters", "2", "--rate-rps", "5")
    cfg = json.loads(out)["config"]
    assert (cfg["adapters"], cfg["offered_rate_rps"]) == (2, pytest.approx(5.0))
    assert "--rate-rps 5: every replayed window's request count is scaled by 0.5 " in err
    assert "(rate_scale 1 -> 0.5); the trace's shape in time is kept" in err


def test_the_cluster_flag_is_not_printed_as_starved_false_beside_starved_requests(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One adapter, one sequence at a time, 100 req/s: the replica falls far behind.
    argv = ["--workload", str(spec_file), "--replicas", "1", "--adapters", "1", "--max-num-seqs",
            "1", "--rate-rps", "100"]  # fmt: skip
    out, _ = _run(capsys, *argv)
    assert "starved: True" not in out
    assert "cluster throughput STARVED (achieved < 0.9 x offered)" in out
    assert "  throughput-starved: the replicas cannot keep up with the offered tokens: add " in out
    assert "slot-bound" not in out
    out, _ = _run(capsys, "--workload", str(spec_file), "--replicas", "2")
    assert "starved: False" not in out
    assert "cluster throughput keeps up (achieved >= 0.9 x offered)" in out
    assert "starved requests (first token after > 60 s, or never): none" in out


def test_many_deferred_requests_say_slot_bound(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 6 adapters, one LoRA slot, 40 req/s: most of the wait for a first token is for the slot.
    argv = ["--workload", str(spec_file), "--replicas", "1", "--max-loras", "1", "--rate-rps",
            "40"]  # fmt: skip
    summary = _summary(capsys, *argv)
    deferred = summary["deferred"]
    assert isinstance(deferred, dict)
    assert deferred["share_of_ttft"] >= 0.5 and not summary["starved"]
    assert deferred["fraction"] == deferred["requests"] / summary["requests"]["ok"]  # type: ignore[index]
    out, _ = _run(capsys, *argv)
    assert (
        f"deferred requests {deferred['requests']} ({deferred['fraction']:.1%} of those served; "
        f"{deferred['share_of_ttft']:.0%} of their time to first token was waiting for a LoRA "
        "slot)\n  slot-bound (>= 50% of the time to first token is waiting for a LoRA slot): "
        "to cut TTFT, raise --max-loras"
    ) in out
    # As many slots as adapters: nothing deferred, no hint.
    argv = ["--workload", str(spec_file), "--replicas", "1", "--max-loras", "6", "--rate-rps",
            "40"]  # fmt: skip
    summary = _summary(capsys, *argv)
    assert summary["deferred"] == {"requests": 0, "fraction": 0.0, "total_s": 0.0,
                                   "share_of_ttft": 0.0}  # fmt: skip
    out, _ = _run(capsys, *argv)
    assert "slot-bound" not in out and "throughput-starved" not in out


def test_the_demo_profile_is_named_and_warned_about(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, err = _run(capsys, "--workload", str(spec_file), "--replicas", "1")
    assert "profile fast (the demo profile: sizes no real deployment)" in out
    assert err == (
        "loragate simulate: note: profile fast is the demo and test profile (hand-set ~2 ms "
        "steps, calibrated on no hardware): its latencies and capacities size no real "
        "deployment; for sizing pass --profile llama-3.1-8b-h100, qwen-2.5-7b-h100, "
        "tiny-llama-cpu or your own (loragate twin profiles)\n"
    )
    out, err = _run(
        capsys, "--workload", str(spec_file), "--replicas", "1", "--profile", "llama-3.1-8b-h100"
    )
    assert "profile llama-3.1-8b-h100, seed 5" in out
    assert err == ""


@pytest.mark.parametrize(
    ("select", "adapters", "rate", "fragment"),
    [
        ("", "4", [], "--adapters: 4 adapters asked, but the ServeGen trace trace.csv.gz has "
         "only 3 clients: give at most 3"),
        # With --rate-rps too (it builds the workload first): the same error.
        ("", "4", ["--rate-rps", "5"], "--adapters: 4 adapters asked, but the ServeGen trace "
         "trace.csv.gz has only 3 clients: give at most 3"),
        # select: sample draws from the clients active in the replayed span (client 13 is not).
        (", select: sample", "3", [], "--adapters: 3 adapters asked, but only 2 of the ServeGen "
         "trace trace.csv.gz's clients are active in the replayed span (select: sample draws "
         "from those): give at most 2"),
    ],
)  # fmt: skip
def test_a_trace_with_too_few_clients_for_adapters_names_the_flag(
    tmp_path: Path,
    select: str,
    adapters: str,
    rate: list[str],
    fragment: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: "sg.yaml:4:12: adapters.count: the trace has only 3 clients", the spec's line of
    # a count the flag had replaced.
    lines = ["client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"]
    for cid, n in ((11, 60), (12, 40), (13, 0)):
        for w in range(2):
            lines.append(f"{cid},{w * 600},{n / 600},1.0,Gamma,1.0,{600 / max(n, 1)}\n")
    with gzip.open(tmp_path / "trace.csv.gz", "wt") as fh:
        fh.writelines(lines)
    spec = tmp_path / "sg.yaml"
    spec.write_text(
        "name: sg\nseed: 2\nduration_s: 20\nadapters: {count: 2, ranks: [8]}\n"
        "arrivals:\n  process: servegen\n"
        f"  servegen: {{file: {tmp_path / 'trace.csv.gz'}, time_scale: 60{select}}}\n"
        "lengths: {prompt: 32, output: 8}\n"
    )
    argv = ["simulate", "--workload", str(spec), "--replicas", "1"]
    assert main([*argv, "--adapters", adapters, *rate]) == 2
    err = capsys.readouterr().err
    assert err == f"loragate simulate: error: {fragment}\n"
    # Without the flag, the spec's own count too high is still at its line.
    spec.write_text(spec.read_text().replace("count: 2", f"count: {adapters}"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loragate simulate: error: {spec}:4:12: adapters.count: "), err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--slo-attainment", "0.5"], "--slo-attainment: used only with --sweep (a single run "
         "has no target to meet: its summary prints the share it attained, 'TTFT SLO <ms> "
         "attained by <share>')"),
        (["--jobs", "2"], "--jobs: used only with --sweep"),
        (["--progress"], "--progress: used only with --sweep"),
    ],
)  # fmt: skip
def test_sweep_only_flags_in_a_single_run_are_refused(
    spec_file: Path, extra: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: accepted and silently ignored (exit 0).
    assert main(["simulate", "--workload", str(spec_file), "--replicas", "1", *extra]) == 2
    assert capsys.readouterr().err == f"loragate simulate: error: {fragment}\n"


def test_one_replica_is_said_in_the_singular(
    spec_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = _run(capsys, "--workload", str(spec_file), "--replicas", "1")
    assert out.startswith("tiny: 1 replica (max_loras 4, "), out  # before: "1 replicas"
    out, _ = _run(capsys, "--workload", str(spec_file), "--replicas", "2")
    assert out.startswith("tiny: 2 replicas (max_loras 4, "), out
