"""Reading a ServeGen window trace: numpy's C parser reads a plain trace (the 326,592 rows of
m-large in ~0.8 s instead of ~3.2 s with the csv module: ``loragate loadtest`` and ``simulate``
spent most of their start-up there) and gives exactly what the csv reader gives; any file it
cannot read (an empty number, quoting, a ragged row) is read by the csv reader, whose errors
name the problem."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

from loragate.core.errors import ConfigError
from loragate.workload.servegen import _csv_columns, _fast_columns, _read_cached, read_trace

HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2"
LAWS = ("Gamma", "Weibull", "", "Lognormal")  # an unknown law name counts as none


def trace_lines(clients: int, windows: int) -> list[str]:
    rng = np.random.default_rng(1)
    lines = [HEADER]
    for c in range(clients):
        for w in range(windows):
            law = LAWS[(c + w) % len(LAWS)]
            rate = 0 if law == "" else round(float(rng.uniform(0, 3)), 6)
            lines.append(f"{c * 7},{w * 600},{rate},1.5,{law},{rng.uniform(0.1, 2):.9g},0.3")
    return lines


def write(path: Path, lines: list[str], *, newline: str = "\n") -> Path:
    data = newline.join(lines) + newline
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8", newline="")
    return path


def same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("name", "newline"), [("t.csv.gz", "\n"), ("t.csv", "\n"), ("t.csv", "\r\n")]
)
def test_the_fast_reader_gives_what_the_csv_reader_gives(
    tmp_path: Path, name: str, newline: str
) -> None:
    path = write(tmp_path / name, trace_lines(40, 30), newline=newline)
    fast = _fast_columns(str(path))
    assert fast is not None
    assert same(fast, _csv_columns(str(path), "k"))
    assert set(fast[3].tolist()) == {0, 1, 2}  # none (empty, Lognormal), Gamma, Weibull


def test_columns_in_another_order_and_extra_columns_are_read_by_name(tmp_path: Path) -> None:
    lines = [",".join(reversed(x.split(","))) + ",extra" for x in trace_lines(5, 4)]
    path = write(tmp_path / "t.csv", lines)
    fast = _fast_columns(str(path))
    assert fast is not None
    assert same(fast, _csv_columns(str(path), "k"))


@pytest.mark.parametrize(
    "change",
    [
        lambda x: x.replace(",0.3", ",") if x.startswith("0,600,") else x,  # empty unread value
        lambda x: x.rsplit(",", 2)[0] + ",,0.3" if x.startswith("7,0,") else x,  # empty shape
        lambda x: x.replace("Gamma", '"Gamma"'),  # quoted
    ],
)
def test_a_trace_the_fast_reader_cannot_read_is_read_by_the_csv_reader(
    tmp_path: Path, change: Any
) -> None:
    path = write(tmp_path / "t.csv", [change(x) for x in trace_lines(4, 4)])
    _read_cached.cache_clear()
    trace = read_trace(path)
    client, _, rate, _, _ = _csv_columns(str(path), "k")
    assert trace.client_ids.tolist() == sorted(set(client.tolist()))
    assert int(trace.counts.sum()) == int(np.rint(rate * 600).sum())


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        (lambda ls: [*ls, "7,1200,1.0"], "cannot read"),  # a short row
        (lambda ls: [*ls[:3], "x,0,1,1,Gamma,1,1"], "bad value in"),
        (lambda ls: ls[:1], "trace has no rows"),
        (lambda ls: ["a,b,c", *ls[1:]], "not a ServeGen window trace"),
    ],
)
def test_bad_traces_are_errors_naming_the_problem(tmp_path: Path, lines: Any, said: str) -> None:
    path = write(tmp_path / "t.csv", lines(trace_lines(3, 3)))
    _read_cached.cache_clear()
    with pytest.raises(ConfigError, match=said):
        read_trace(path)


def calls_to_read(path: Path) -> int:
    """Python-level calls (functions and builtins) while ``path`` is read, uncached."""
    _read_cached.cache_clear()
    calls = 0

    def count(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        read_trace(path)
    finally:
        sys.setprofile(None)
    return calls


def test_reading_a_trace_runs_no_python_code_per_row(tmp_path: Path) -> None:
    """The measure of the speed-up that does not depend on the machine's load: the calls that
    18,000 more rows cost (first reads pay for imports and regex compilations: compared after
    one)."""
    small = write(tmp_path / "small.csv.gz", trace_lines(20, 100))
    large = write(tmp_path / "large.csv.gz", trace_lines(200, 100))
    calls_to_read(small)
    more = calls_to_read(large) - calls_to_read(small)
    assert more < 1_000, more  # the csv reader: a dict lookup per row, 18,000+
