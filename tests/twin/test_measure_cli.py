"""``loragate twin measure`` end to end against a vLLM-like server over loopback (the twin replica,
``loragate replica``, speaks vLLM's API and refuses what vLLM refuses): it writes the calibration
CSVs in the layout ``loragate twin calibrate`` reads (the same columns as
``data/tiny-llama-cpu/calibration``, which ``bench/calibrate_vllm_cpu.py`` measured with the same
sweeps), a profile is fitted from them, and a server that does not start, refuses an adapter or
cannot be run is one error with the reason (the server log's tail)."""

from __future__ import annotations

import csv
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.twin.calibrate import calibrate_profile

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny-llama-cpu" / "calibration"
PLACEHOLDER_ARGS = "{port} {max_loras} {max_cpu_loras} {max_lora_rank} {max_num_seqs}"
TWIN_REPLICA = (
    f"{shlex.quote(sys.executable)} -m loragate.cli replica --port {{port}} --enable-lora "
    "--max-loras {max_loras} --max-cpu-loras {max_cpu_loras} --max-lora-rank {max_lora_rank} "
    "--max-num-seqs {max_num_seqs} --max-model-len 1024 --profile tiny-llama-cpu"
)


def _adapter(folder: Path, rank: int, **extra: object) -> str:
    folder.mkdir(parents=True)
    config = {"r": rank, "lora_alpha": 16, "target_modules": ["q_proj"], **extra}
    (folder / "adapter_config.json").write_text(str(config).replace("'", '"'))
    return str(folder)


def _measure(tmp_path: Path, command: str, *more: str) -> list[str]:
    return [
        "twin", "measure", "--model", "my-model", "--out", str(tmp_path / "calib"),
        "--vllm-command", command, *more,
    ]  # fmt: skip


def _error_line(stderr: str) -> str:
    """The error, after the progress lines (``[HH:MM:SS] ...``) that go to stderr too."""
    lines = stderr.splitlines()
    return "\n".join(lines[next(i for i, x in enumerate(lines) if not x.startswith("[")) :])


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_quick_measure_writes_the_calibration_layout_and_a_profile_fits_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r8 = _adapter(tmp_path / "a8", 8)
    r16 = _adapter(tmp_path / "a16", 16)
    argv = _measure(tmp_path, TWIN_REPLICA, "--quick", "--adapter", r8, "--adapter", r16)
    assert main(argv) == 0
    out = capsys.readouterr()
    calib = tmp_path / "calib"
    assert f"next: loragate twin calibrate --data {calib} --model my-model" in out.out
    for name in ("base_latency", "lora_overhead", "loading", "kv_capacity"):
        columns, _ = _rows(calib / f"{name}.csv")
        assert columns == _rows(TINY / f"{name}.csv")[0], name
    _, base = _rows(calib / "base_latency.csv")
    assert [(r["phase"], r["concurrency"]) for r in base] == [
        ("decode", "1"), ("decode", "2"), ("decode", "4"), ("decode", "8"),
        ("prefill", "1"), ("prefill", "1"),
    ]  # fmt: skip
    assert {r["model"] for r in base} == {"my-model"}
    _, lora = _rows(calib / "lora_overhead.csv")
    # per batch (4, 8): base-model requests, then 1 and 4 distinct rank-8 adapters (quick)
    assert [(r["concurrency"], r["n_distinct_adapters"], r["adapter_rank"]) for r in lora] == [
        ("4", "0", ""), ("4", "1", "8"), ("4", "4", "8"),
        ("8", "0", ""), ("8", "1", "8"), ("8", "4", "8"),
    ]  # fmt: skip
    assert all(int(r["completed"]) == int(r["num_prompts"]) > 0 for r in lora)
    _, loading = _rows(calib / "loading.csv")
    assert [(r["adapter_rank"], r["max_loras"], r["max_cpu_loras"]) for r in loading] == [
        ("8", "1", "4"), ("16", "1", "4"),
    ]  # fmt: skip
    _, kv = _rows(calib / "kv_capacity.csv")
    assert [(r["group"], r["enable_lora"], r["max_loras"]) for r in kv] == [
        ("measured_base", "0", ""), ("measured_lora_overhead", "1", "4"),
        ("measured_loading", "1", "1"),
    ]  # fmt: skip
    assert sorted(p.name for p in (calib / "logs").iterdir()) == [
        "base.log", "loading.log", "lora.log",
    ]  # fmt: skip

    profile, report = calibrate_profile(str(calib), "my-model", name="my-model")
    assert report.components["base_decode"].rows == 4
    assert report.components["lora"].rows == 4
    # the replica ran tiny-llama-cpu's profile: its own LoRA step cost comes back
    assert 5.0 < profile.lora.extra_intercept_ms < 10.0
    assert profile.step.decode_ms_per_seq > 0


def test_a_server_that_exits_at_start_up_shows_its_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    program = "import sys; print('CUDA error: no kernel image is available'); sys.exit(3)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} {PLACEHOLDER_ARGS}"
    r8 = _adapter(tmp_path / "a8", 8)
    assert main(_measure(tmp_path, command, "--adapter", r8, "--vllm-base-command",
                         f"{shlex.quote(sys.executable)} -c {shlex.quote(program)} "
                         "{port} {max_num_seqs}")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert _error_line(err).startswith("loragate twin measure: base server (")
    assert "the server exited with status 3 during start-up" in err
    assert "CUDA error: no kernel image is available" in err
    assert str(tmp_path / "calib" / "logs" / "base.log") in err


def test_a_command_that_cannot_run_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r8 = _adapter(tmp_path / "a8", 8)
    command = f"{tmp_path}/no-such-vllm serve M {PLACEHOLDER_ARGS}"
    assert main(_measure(tmp_path, command, "--adapter", r8)) == 2
    err = capsys.readouterr().err
    assert _error_line(err).startswith("loragate twin measure: cannot run the server command ")
    assert "no-such-vllm" in err


def test_an_adapter_the_server_refuses_is_named_with_its_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')  # vLLM needs lora_alpha too
    argv = _measure(tmp_path, TWIN_REPLICA, "--quick", "--parts", "lora", "--adapter", str(folder))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert _error_line(err).startswith(
        f"loragate twin measure: the server refused adapter r8-0 ({folder}): 500"
    )
    assert "lora_alpha" in err


@pytest.mark.parametrize(
    ("more", "says"),
    [
        (["--vllm-command", "vllm serve M --port {port}"],
         "loragate twin measure: --vllm-command: the command lacks the placeholder(s) "
         "{max_loras}, {max_cpu_loras}, {max_lora_rank}, {max_num_seqs}"),
        (["--vllm-command", TWIN_REPLICA],
         "loragate twin measure: --adapter: no adapter given"),
        (["--vllm-command", TWIN_REPLICA, "--adapter", "/nonexistent/adapter"],
         "loragate twin measure: --adapter: /nonexistent/adapter is not a folder"),
        (["--vllm-command", TWIN_REPLICA, "--parts", "base,lora,prefil"],
         "loragate twin measure: --parts: unknown part(s) ['prefil']"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_before_starting_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], more: list[str], says: str
) -> None:
    argv = ["twin", "measure", "--model", "m", "--out", str(tmp_path / "calib"), *more]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(says)
    assert not (tmp_path / "calib").exists()


def test_a_server_too_short_for_the_sweep_is_refused_with_the_length_needed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = TWIN_REPLICA.replace("--max-model-len 1024", "--max-model-len 128")
    argv = _measure(tmp_path, command, "--quick", "--adapter", _adapter(tmp_path / "a8", 8))
    assert main(argv) == 2
    assert _error_line(capsys.readouterr().err) == (
        "loragate twin measure: the base server's max_model_len is 128 but the sweep sends "
        "requests of up to 264 tokens: raise --max-model-len in the server command"
    )


def _pids_with(marker: str, *, besides: int) -> list[int]:
    """Processes whose command line holds ``marker``, other than ``besides`` (the measure)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(besides):
            continue
        try:
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize(
    "after",
    [
        "starting base server",  # SIGTERM while the server starts (waiting for /health 200)
        "base: healthy",  # SIGTERM while it is measured
    ],
)
def test_sigterm_stops_the_server_being_measured(tmp_path: Path, after: str) -> None:
    """The server runs in its own session (so its whole tree can be stopped): a SIGTERM to
    ``twin measure`` must stop it too, not leave it running (before: a SIGTERM during the
    start-up, which takes minutes for a real vLLM, left it running)."""
    marker = f"measured-{uuid.uuid4().hex[:8]}"
    command = TWIN_REPLICA + f" --served-model-name {marker}"
    argv = [sys.executable, "-m", "loragate.cli", *_measure(tmp_path, command, "--quick",
            "--adapter", _adapter(tmp_path / "a8", 8))]  # fmt: skip
    with subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if after in line:
                    break
            while not _pids_with(marker, besides=proc.pid):  # spawned right after the line
                assert proc.poll() is None, "twin measure ended before starting a server"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert _pids_with(marker, besides=proc.pid) == []
