"""Spec files written by hand: YAML quirks, one-line errors that name the file, and limits."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from loragate.core.errors import ConfigError
from loragate.workload import Workload, load_spec
from loragate.workload import modulation as modulation_module
from loragate.workload.spec import OnOffSpec

GOOD = """\
seed: 1
duration_s: 60
adapters: {count: 4}
arrivals: {process: poisson, rate_rps: 2}
"""

SERVEGEN_HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"


def _write(tmp_path: Path, text: str, name: str = "w.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _servegen_spec(tmp_path: Path, trace: Path, duration_s: float, extra: str = "") -> Path:
    text = f"""\
duration_s: {duration_s}
adapters: {{count: 1}}
arrivals: {{process: servegen, servegen: {{file: {trace}{extra}}}}}
"""
    return _write(tmp_path, text, f"sg{extra.replace(' ', '').replace(',', '')}.yaml")


def _error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        Workload(load_spec(path))
    return exc.value


def test_onoff_start_on_and_off_unquoted(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML's default) reads bare on/off as booleans; the README writes `start: on`.
    for start in ("on", "off"):
        text = GOOD.replace(
            "rate_rps: 2}",
            f"onoff: {{on_s: 5, off_s: 5, on_rate_rps: 4, start: {start}}}}}",
        )
        spec = load_spec(_write(tmp_path, text))
        assert spec.arrivals.onoff == OnOffSpec(on_s=5, off_s=5, on_rate_rps=4, start=start)


def test_yes_no_are_strings_not_booleans(tmp_path: Path) -> None:
    spec = load_spec(_write(tmp_path, GOOD + "name: yes\ndescription: off\n"))
    assert (spec.name, spec.description) == ("yes", "off")


def test_duplicate_key_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "duration_s: 120\n")
    err = str(_error(path))
    assert err.startswith(f"{path}:5:1: duplicate key 'duration_s'")
    assert "\n" not in err


def test_yaml_syntax_error_is_one_line_with_position(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.replace("{count: 4}", "{count: 4"))
    err = str(_error(path))
    assert err.startswith(f"{path}:4:")
    assert "not valid YAML" in err
    assert "\n" not in err
    tab = _write(tmp_path, "seed: 1\nadapters:\n\tcount: 4\n", "tab.yaml")
    err = str(_error(tab))
    assert err.startswith(f"{tab}:3:1: not valid YAML") and "\n" not in err


@pytest.mark.parametrize(
    ("old", "new", "where", "key", "fragment"),
    [
        ("rate_rps: 2", "rate_rps: -2", "4:30", "arrivals.rate_rps", "must be > 0, got -2"),
        (
            "count: 4",
            "count: 10000000",
            "3:12",
            "adapters.count",
            "must be <= 100000, got 10000000",
        ),
        (
            "adapters:",
            "adaptors:",
            "3:1",
            "adaptors",
            "unknown key (is 'adaptors' a misspelling of 'adapters'?)",
        ),
        ("seed: 1", "seed: 1\nlenghts: {}", "2:1", "lenghts", "misspelling of 'lengths'"),
        ("poisson", "weibull", "4:12", "arrivals.process", "must be one of"),
        (
            "count: 4",
            "count: 4, name_pattern: 'a-{j}'",
            "3:22",
            "adapters.name_pattern",
            "bad pattern 'a-{j}': no field {j} (it may use {i})",
        ),
    ],
)
def test_every_error_starts_with_the_file_and_line(
    tmp_path: Path, old: str, new: str, where: str, key: str, fragment: str
) -> None:
    path = _write(tmp_path, GOOD.replace(old, new))
    err = _error(path)
    assert err.key == key
    assert str(err).startswith(f"{path}:{where}: {key}: ")
    assert fragment in str(err)


def test_empty_and_non_utf8_spec_files(tmp_path: Path) -> None:
    empty = _write(tmp_path, "", "empty.yaml")
    assert str(_error(empty)) == f"{empty}: the spec is empty"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"seed: 1\n\xff\xfe\x00")
    err = str(_error(binary))
    assert err == f"{binary} is not a UTF-8 text file (byte 8: 0xff)"


def test_errors_found_when_building_the_workload_name_the_file(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(SERVEGEN_HEADER + "1,0,1.0,1,Gamma,1,1\n1,600,1.0,1,Gamma,1,1\n")
    path = _servegen_spec(tmp_path, trace, 3600)
    spec = load_spec(path)  # the trace's length is known only when it is read
    with pytest.raises(ConfigError) as exc:
        Workload(spec)
    assert str(exc.value).startswith(f"{path}:1:1: duration_s: ")
    assert "exceeds the trace" in str(exc.value)


def test_servegen_window_must_match_the_trace(tmp_path: Path) -> None:
    # Windows 600 s apart read as 300 s windows would halve every client's rate, silently.
    trace = tmp_path / "t.csv.gz"
    with gzip.open(trace, "wt") as fh:
        fh.write(SERVEGEN_HEADER)
        fh.writelines(f"1,{w * 600},1.0,1,Gamma,1,1\n" for w in range(4))
    wl = Workload(load_spec(_servegen_spec(tmp_path, trace, 600, ", window_s: 600")))
    assert wl.offered_rate_rps == pytest.approx(1.0)
    for window in ("300", "1200"):
        err = _error(_servegen_spec(tmp_path, trace, 600, f", window_s: {window}"))
        assert err.key == "arrivals.servegen.window_s"
        assert "start 600 s apart" in str(err)


def test_servegen_duplicate_rows_are_an_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(SERVEGEN_HEADER + "1,0,1.0,1,Gamma,1,1\n1,600,1,1,Gamma,1,1\n1,0,2,1,,0,0\n")
    err = _error(_servegen_spec(tmp_path, trace, 600))
    assert err.key == "arrivals.servegen.file"
    assert "client 1 has two rows for the window at 0 s" in str(err)


@pytest.mark.parametrize(
    ("content", "column", "fragment"),
    [
        (b"\x7fELF\x02\x01\x01\x00\xff" * 64, None, "is not a UTF-8 text file"),
        (b"\x7fELF\x02\x01\x01\x00" * 64, None, "line 1: not a number: '\\x7fELF"),
        (b"12\nabc\n", None, "line 2: not a number: 'abc'"),
        (b"a,b\n1,2\n3,x\n", "b", "line 3: not a number: 'x'"),
        (b'{"a": 1}\n{"a": 2\n', "a", "line 2: not JSON"),
        (b'{"a": 1}\n{"b": 2}\n', "a", "line 2 has no field 'a'"),
    ],
)
def test_empirical_length_file_errors_are_short(
    tmp_path: Path, content: bytes, column: str | None, fragment: str
) -> None:
    suffix = {"b": ".csv", "a": ".jsonl"}.get(column or "", ".txt")
    data = tmp_path / f"lens{suffix}"
    data.write_bytes(content)
    col = f", column: {column}" if column else ""
    text = GOOD + f"lengths: {{prompt: {{kind: empirical, file: {data.name}{col}}}}}\n"
    err = _error(_write(tmp_path, text))
    assert err.key == "lengths.prompt.file"
    assert fragment in str(err)
    assert len(str(err)) < 300


def test_missing_file_lists_each_place_tried_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the spec's directory is also the current one
    text = GOOD + "lengths: {prompt: {kind: empirical, file: nope.txt}}\n"
    err = str(_error(_write(tmp_path, text)))
    assert err.count("nope.txt") == 1
    text = GOOD + f"lengths: {{prompt: {{kind: empirical, file: {tmp_path}}}}}\n"
    assert f"{tmp_path} is a directory, not a file" in str(_error(_write(tmp_path, text)))


def test_short_diurnal_period_over_a_long_run_keeps_grids_small(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The rate multiplier's integral was taken on one grid over the whole run (512 points per
    # period): a 1 s period over 10^7 s asked for 5 * 10^9 points at once.
    monkeypatch.setattr(modulation_module, "MAX_GRID_POINTS", 4097)
    sizes: list[int] = []
    grid = modulation_module.Modulation.grid

    def recording_grid(
        self: modulation_module.Modulation, t0: float, t1: float
    ) -> tuple[np.ndarray, np.ndarray]:
        out = grid(self, t0, t1)
        sizes.append(len(out[0]))
        return out

    monkeypatch.setattr(modulation_module.Modulation, "grid", recording_grid)
    period, amplitude, phase, duration = 3.0, 0.8, 0.7, 1000.5
    text = GOOD.replace("duration_s: 60", f"duration_s: {duration}").replace(
        "rate_rps: 2}",
        f"rate_rps: 2, diurnal: {{period_s: {period}, amplitude: {amplitude}, phase_s: {phase}}}}}",
    )
    wl = Workload(load_spec(_write(tmp_path, text)))
    n = sum(len(b) for b in wl.batches())
    assert max(sizes) <= 4097
    # Closed form of the mean multiplier 1 + A sin(2 pi (t - phase) / P) over [0, duration].
    w = 2 * math.pi / period
    swing = math.cos(-w * phase) - math.cos(w * (duration - phase))
    mean = 1 + amplitude / (w * duration) * swing
    assert wl.offered_rate_rps == pytest.approx(2 * mean, rel=1e-6)
    assert 0.8 * 2 * duration < n < 1.2 * 2 * duration


def test_a_run_asking_for_too_many_requests_is_refused(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, GOOD.replace("rate_rps: 2", "rate_rps: 1e9")))
    assert err.key == "arrivals"
    assert "more than a run may have" in str(err)
    err = _error(_write(tmp_path, GOOD.replace("duration_s: 60", "duration_s: 1e12")))
    assert err.key == "duration_s"


def test_servegen_windows_silent_for_every_client_are_noted(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = [f"{c},{w * 600},{0 if w == 1 else 0.5},1,Gamma,1,1\n" for c in (1, 2) for w in range(3)]
    trace.write_text(SERVEGEN_HEADER + "".join(rows))
    wl = Workload(load_spec(_servegen_spec(tmp_path, trace, 1800)))
    assert wl.notes == (
        "1 of the 3 replayed 600 s windows of t.csv have no request from any client "
        "(collection gaps in some traces): no arrivals then",
    )
    assert Workload(load_spec(_servegen_spec(tmp_path, trace, 600))).notes == ()
