"""ServeGen per-client window replay."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loragate.core.errors import ConfigError
from loragate.workload import Workload, spec_from_mapping
from loragate.workload.servegen import read_trace

HEADER = "client_id,window_start_s,rate_rps,iat_cv,iat_dist,dist_param1,dist_param2\n"
REAL = (
    Path(__file__).resolve().parents[3]
    / "shared/traces/servegen-alibaba-2025/language_m-large_client_windows.csv.gz"
)

# client -> per-window request counts (window 600 s); 4 windows.
COUNTS = {
    7: [600, 0, 1200, 30],
    3: [60, 60, 60, 60],
    9: [0, 0, 0, 0],
    5: [3000, 2400, 1800, 1200],
}
LAWS = {7: ("Gamma", 0.1, 50.0), 3: ("Weibull", 0.5, 2.0), 9: ("", 0, 0), 5: ("Gamma", 1.0, 0.2)}


def _write_trace(path: Path) -> Path:
    lines = [HEADER]
    for cid, counts in COUNTS.items():
        law, p1, p2 = LAWS[cid]
        for w, n in enumerate(counts):
            dist = law if n else ""
            lines.append(
                f"{cid},{w * 600},{n / 600},1.0,{dist},{p1 if n else 0},{p2 if n else 0}\n"
            )
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)
    return path


def _spec(trace: Path, count: int = 3, duration_s: float = 2400, **sg: Any) -> Workload:
    return Workload(
        spec_from_mapping(
            {
                "duration_s": duration_s,
                "seed": 5,
                "adapters": {"count": count, "ranks": [8, 16]},
                "arrivals": {"process": "servegen", "servegen": {"file": str(trace), **sg}},
            }
        )
    )


def _per_window(wl: Workload, window_sim_s: float) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    n_w = int(np.ceil(wl.spec.duration_s / window_sim_s))
    for b in wl.batches():
        for i, name in enumerate(wl.adapter_names):
            w = (b.t_s[b.adapter_index == i] // window_sim_s).astype(int)
            got = np.bincount(w, minlength=n_w)[:n_w]
            prev = out.get(name, [0] * n_w)
            out[name] = [p + int(g) for p, g in zip(prev, got, strict=True)]
    return out


def test_reader_matrix(tmp_path: Path) -> None:
    trace = read_trace(_write_trace(tmp_path / "t.csv.gz"))
    assert trace.client_ids.tolist() == [3, 5, 7, 9]
    assert trace.counts[2].tolist() == COUNTS[7]
    assert trace.n_windows == 4


def test_top_clients_and_exact_window_counts(tmp_path: Path) -> None:
    wl = _spec(_write_trace(tmp_path / "t.csv.gz"))
    # Busiest first: 5 (8400), 7 (1830), 3 (240).
    assert wl.adapter_names == ("client-5", "client-7", "client-3")
    got = _per_window(wl, 600)
    for cid in (5, 7, 3):
        assert got[f"client-{cid}"] == COUNTS[cid]
    assert wl.offered_rate_rps == pytest.approx((8400 + 1830 + 240) / 2400)


def test_offset_time_scale_and_rate_scale(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "t.csv.gz")
    # Windows 1..3 of the trace, replayed 10x faster: 60 s of simulation per window.
    wl = _spec(trace, duration_s=180, offset_s=600, time_scale=10)
    got = _per_window(wl, 60)
    assert got["client-5"] == COUNTS[5][1:]
    assert got["client-7"] == COUNTS[7][1:]
    # Half the load: binomial-like thinning of each window's count.
    half = _per_window(_spec(trace, rate_scale=0.5), 600)
    for name, full in (("client-5", COUNTS[5]), ("client-7", COUNTS[7])):
        assert half[name] == pytest.approx([n / 2 for n in full], abs=1)


def test_burstiness_follows_fitted_law(tmp_path: Path) -> None:
    wl = _spec(_write_trace(tmp_path / "t.csv.gz"), count=2)
    t = np.concatenate([b.t_s for b in wl.batches()])
    a = np.concatenate([b.adapter_index for b in wl.batches()])
    # client-5 windows use Gamma(shape 1) = exponential gaps: CV ~ 1.
    iat5 = np.diff(t[(a == 0) & (t < 600)])
    assert np.std(iat5) / np.mean(iat5) == pytest.approx(1.0, abs=0.1)
    # client-7 window 2 uses Gamma(shape 0.1): CV = 1/sqrt(0.1) ~ 3.2, clearly bursty.
    iat7 = np.diff(t[(a == 1) & (t >= 1200) & (t < 1800)])
    assert np.std(iat7) / np.mean(iat7) > 2.0


def test_select_ids_and_sample(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "t.csv.gz")
    wl = _spec(trace, count=2, select="ids", client_ids=[3, 9])
    assert set(wl.adapter_names) == {"client-3", "client-9"}
    with pytest.raises(ConfigError) as exc:
        _spec(trace, count=3, select="ids", client_ids=[3, 9])
    assert exc.value.key == "adapters.count"
    with pytest.raises(ConfigError) as exc:
        _spec(trace, count=1, select="ids", client_ids=[42])
    assert exc.value.key == "arrivals.servegen.client_ids"
    sampled = _spec(trace, count=2, select="sample")
    assert set(sampled.adapter_names) <= {"client-3", "client-5", "client-7"}
    with pytest.raises(ConfigError) as exc:
        _spec(trace, count=4, select="sample")  # client 9 is never active
    assert exc.value.key == "adapters.count"


def test_span_beyond_trace_is_an_error(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "t.csv.gz")
    with pytest.raises(ConfigError) as exc:
        _spec(trace, duration_s=2401)
    assert exc.value.key == "duration_s"
    with pytest.raises(ConfigError) as exc:
        _spec(trace, count=5)
    assert exc.value.key == "adapters.count"


def test_not_a_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError) as exc:
        _spec(bad)
    assert exc.value.key == "arrivals.servegen.file"


@pytest.mark.skipif(not REAL.is_file(), reason="shared ServeGen trace not present")
def test_real_trace_window_counts() -> None:
    wl = _spec(REAL, count=10, duration_s=3600, offset_s=3 * 86_400, rate_scale=0.2)
    trace = read_trace(REAL)
    rows = {int(c): i for i, c in enumerate(trace.client_ids)}
    got = _per_window(wl, 600)
    w0 = 3 * 86_400 // 600
    for name, counts in got.items():
        want = trace.counts[rows[int(name.split("-")[1])], w0 : w0 + 6] * 0.2
        assert np.allclose(counts, want, atol=1.0)
    span = [
        int(trace.counts[rows[int(n.split("-")[1])], w0 : w0 + 6].sum()) for n in wl.adapter_names
    ]
    assert span == sorted(span, reverse=True)
    assert span[0] == trace.counts[:, w0 : w0 + 6].sum(axis=1).max()
