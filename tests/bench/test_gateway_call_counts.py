"""``bench/gateway_overhead.py --calls``: Python function calls per request in the gateway's
process, for A/B comparisons that do not depend on the machine's load.

The real bench runs: the instant upstream, ``loragate serve`` under cProfile
(``bench/_profiled_serve.py``), requests over loopback. The same tree measured twice (as
``--extra-src``) must count the same within a call or two per request, where the CPU µs figure
moves ±30 % between rounds here, and however busy the machine is: nothing that runs by the
clock (the poller, the state store's housekeeping) is counted as a request's work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def test_calls_counts_each_tree_and_kind_and_an_ab_of_one_tree_agrees(tmp_path: Path) -> None:
    out = tmp_path / "calls.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "gateway_overhead.py"), "--calls", "40",
         "--calls-warmup", "10", "--policies", "least_loaded",
         "--extra-src", f"same={ROOT / 'src'}", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    rows = {(r["target"], r["kind"]): r for r in doc["rows"]}
    assert set(rows) == {
        (target, kind)
        for target in ("loragate least_loaded", "loragate@same least_loaded")
        for kind in ("non-stream", "stream")
    }
    for (target, kind), row in rows.items():
        assert row["requests"] == 40
        assert 50 < row["calls_per_request"] < 5000, row
        by_function = doc["by_function"][f"{target} {kind}"]
        # the request path is in the count: the proxy's handler ran once per request
        assert any(name.startswith("loragate/gateway/") for name in by_function)
        # background loops that run by the clock are kept out of the window: counted, they
        # made a request that took longer (a busy machine) cost more calls
        clocked = ("loragate/gateway/shared.py:run", "loragate/backends/pool.py:_run")
        assert not [name for name in clocked if name in by_function], (target, kind)
    for kind in ("non-stream", "stream"):
        a = rows[("loragate least_loaded", kind)]["calls_per_request"]
        b = rows[("loragate@same least_loaded", kind)]["calls_per_request"]
        assert abs(a - b) <= 0.01 * a, (kind, a, b)  # measured: within 0.1 %, under load too
    a_stream = rows[("loragate least_loaded", "stream")]["calls_per_request"]
    a_plain = rows[("loragate least_loaded", "non-stream")]["calls_per_request"]
    assert a_stream > a_plain  # a stream's chunks are relayed one read at a time
    assert "loragate@same least_loaded vs loragate least_loaded, stream:" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calls", "0"], "--calls must be 1..100000 (got 0)"),
        (["--calls", "10", "--calls-warmup", "-1"], "--calls-warmup and --calls-top must be >= 0"),
        (["--calls", "10", "--no-gateway"], "--no-gateway leaves no loragate target"),
    ],
)
def test_bad_call_count_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "gateway_overhead.py"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(message)
    assert "Traceback" not in done.stderr
