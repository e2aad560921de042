"""A spec's relative trace paths from a checkout that is not beside the traces.

Found in a soak test: ``workload/servegen.yaml`` names its trace
``../../shared/traces/servegen-alibaba-2025/...``, relative to the spec, so ``loragate loadtest``
and ``loragate simulate`` with it failed from a clone anywhere but beside ``shared/``
(``file not found (tried /tmp/walk-l/workload/../../shared/traces/...)``). The
``LORAGATE_TRACES_DIR`` environment variable or the ``--traces-dir`` flag now names a copy of
the traces, looked in first by the path's trailing parts; without either, the error says how
to give one.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loragate.cli import main
from loragate.core.errors import ConfigError
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica
from loragate.workload import Workload, load_spec
from loragate.workload.file_paths import TRACES_DIR_ENV, trailing_parts

HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"
TRACE = "../../shared/traces/sg/windows.csv"
LENGTHS = "../../shared/traces/azure/conv.csv"
SPEC = f"""\
seed: 3
duration_s: 60
adapters: {{count: 2, name_pattern: "client-{{client}}"}}
arrivals:
  process: servegen
  servegen:
    file: {TRACE}
lengths:
  prompt: {{kind: empirical, file: {LENGTHS}, column: ContextTokens}}
  output: 4
"""


def _traces(root: Path) -> Path:
    """A copy of the traces at ``root/shared/traces`` (2 clients at 10 req/s each)."""
    traces = root / "shared" / "traces"
    (traces / "sg").mkdir(parents=True)
    (traces / "azure").mkdir()
    rows = [f"{c},0,10.0,1.0,Gamma,1.0,0.1\n" for c in (7, 9)]
    (traces / "sg" / "windows.csv").write_text(HEADER + "".join(rows))
    (traces / "azure" / "conv.csv").write_text("ContextTokens,GeneratedTokens\n40,4\n80,8\n")
    return traces


def _clone(root: Path) -> Path:
    """A checkout whose ``workload/sg.yaml`` is not beside the traces."""
    spec = root / "clone" / "workload" / "sg.yaml"
    spec.parent.mkdir(parents=True)
    spec.write_text(SPEC)
    return spec


def test_trailing_parts_drop_the_leading_dots() -> None:
    got = [str(p) for p in trailing_parts(Path(TRACE))]
    assert got == ["shared/traces/sg/windows.csv", "traces/sg/windows.csv", "sg/windows.csv",
                   "windows.csv"]  # fmt: skip


def test_without_a_traces_dir_the_error_says_how_to_give_one(tmp_path: Path) -> None:
    spec = _clone(tmp_path)
    _traces(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as exc:
        load_spec(spec, environ={})
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith(f"{spec}:7:5: arrivals.servegen.file: file not found (tried ")
    assert str(spec.parent / TRACE) in text
    assert f"set {TRACES_DIR_ENV} or pass --traces-dir" in text


@pytest.mark.parametrize(
    "level",
    ["elsewhere", "elsewhere/shared", "elsewhere/shared/traces", "elsewhere/shared/traces/sg"],
)
def test_the_variable_finds_the_traces_at_any_level_of_their_copy(
    tmp_path: Path, level: str
) -> None:
    spec = _clone(tmp_path)
    traces = _traces(tmp_path / "elsewhere")
    environ = {TRACES_DIR_ENV: str(tmp_path / level)}
    if level.endswith("/sg"):  # the lengths file is not under this one: not found
        with pytest.raises(ConfigError) as exc:
            load_spec(spec, environ=environ)
        assert exc.value.key == "lengths.prompt.file"
        assert f"tried under {TRACES_DIR_ENV} {tmp_path / level}: shared/traces/azure" in str(
            exc.value
        )
        return
    loaded = load_spec(spec, environ=environ)
    assert loaded.arrivals.servegen is not None
    assert loaded.arrivals.servegen.file.resolve() == (traces / "sg" / "windows.csv").resolve()
    assert Workload(loaded).adapter_names == ("client-7", "client-9")


def test_the_flag_wins_over_the_variable_and_the_spec_relative_copy(tmp_path: Path) -> None:
    spec = _clone(tmp_path)
    _traces(tmp_path)  # beside the clone: the spec-relative path reaches it
    chosen = _traces(tmp_path / "chosen")
    _traces(tmp_path / "env")
    loaded = load_spec(spec, traces_dir=chosen, environ={TRACES_DIR_ENV: str(tmp_path / "env")})
    assert loaded.arrivals.servegen is not None
    assert loaded.arrivals.servegen.file == chosen / "sg" / "windows.csv"
    loaded = load_spec(spec, environ={TRACES_DIR_ENV: str(tmp_path / "env")})
    assert loaded.arrivals.servegen is not None
    assert loaded.arrivals.servegen.file == tmp_path / "env/shared/traces/sg/windows.csv"


def test_a_file_found_nowhere_lists_every_place_tried(tmp_path: Path) -> None:
    spec = _clone(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as exc:
        load_spec(spec, environ={TRACES_DIR_ENV: str(empty)})
    text = str(exc.value)
    assert "\n" not in text
    assert exc.value.key == "arrivals.servegen.file"
    assert (
        f"tried under {TRACES_DIR_ENV} {empty}: shared/traces/sg/windows.csv, "
        "traces/sg/windows.csv, sg/windows.csv, windows.csv; then "
        f"{spec.parent / TRACE}, {Path.cwd() / TRACE})"
    ) in text


def test_a_variable_that_names_no_directory_is_said(tmp_path: Path) -> None:
    spec = _clone(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_spec(spec, environ={TRACES_DIR_ENV: str(tmp_path / "nope")})
    assert f"{TRACES_DIR_ENV} {tmp_path / 'nope'} is not a directory; tried " in str(exc.value)
    # A spec with no relative file does not look at it.
    plain = tmp_path / "plain.yaml"
    plain.write_text("duration_s: 5\nadapters: {count: 1}\narrivals: {rate_rps: 1}\n")
    assert load_spec(plain, environ={TRACES_DIR_ENV: str(tmp_path / "nope")}).duration_s == 5


def test_simulate_runs_the_clone_spec_with_the_flag_or_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _clone(tmp_path)
    traces = _traces(tmp_path / "elsewhere")
    args = ["simulate", "--workload", str(spec), "--replicas", "1", "--duration-s", "2", "--json"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "arrivals.servegen.file: file not found" in err and TRACES_DIR_ENV in err
    assert main([*args, "--traces-dir", str(traces)]) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["requests"]["total"] == summary["requests"]["ok"] > 0
    assert main([*args, "--traces-dir", str(tmp_path / "nope")]) == 2
    assert f"--traces-dir: {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err
    monkeypatch.setenv(TRACES_DIR_ENV, str(traces))
    assert main(args) == 0, capsys.readouterr().err


async def test_loadtest_runs_the_clone_spec_with_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _clone(tmp_path)
    traces = _traces(tmp_path / "elsewhere")
    config = ReplicaConfig(served_model_name="base", seed=1)
    async with run_replica(config, host="127.0.0.1", port=0) as replica:
        argv = ["loadtest", "--progress-s", "0", "--url", replica.url, "--workload", str(spec)]
        argv += ["--max-requests", "3", "--timeout-s", "30"]
        assert await asyncio.to_thread(main, argv) == 2
        assert "set LORAGATE_TRACES_DIR or pass --traces-dir" in capsys.readouterr().err
        code = await asyncio.to_thread(main, [*argv, "--traces-dir", str(traces)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"reading the ServeGen trace {traces / 'sg' / 'windows.csv'}" in err
