"""Replay of ServeGen per-client window traces (Xiang et al., "ServeGen", arXiv 2505.09999).

The trace gives, per client and 10-minute window, the mean rate, the inter-arrival CV and the
best-fit inter-arrival law (``Gamma`` or ``Weibull`` with ``(shape, scale)``). As ServeGen's own
generator does, a window with rate ``r`` gets ``n = round(r * window)`` requests whose
inter-arrival times are drawn from the window's law and rescaled to span the window; we draw
``n + 1`` gaps and keep the first ``n`` partial sums, so arrivals fall strictly inside the window
and the gap into the next window belongs to the same law. The scale cancels in the rescaling, so
only the shape (the burstiness) matters. A client becomes an adapter.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.workload.spec import ServeGenSpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

NO_DIST, GAMMA, WEIBULL = 0, 1, 2
_DIST_CODES = {"": NO_DIST, "Gamma": GAMMA, "Weibull": WEIBULL}
REQUIRED_COLUMNS = ("client_id", "window_start_s", "rate_rps", "iat_dist", "dist_param1")


class TooFewClientsError(ConfigError):
    """``adapters.count`` asks for more clients than the trace ``trace`` has (``active_only``:
    than are active in its replayed span, which ``select: sample`` draws from): ``available``."""

    def __init__(self, *, available: int, trace: Path, active_only: bool) -> None:
        detail = (
            f"only {available} clients are active in the replayed span"
            if active_only
            else f"the trace has only {available} clients"
        )
        super().__init__(detail, key="adapters.count")
        self.available = available
        self.trace = trace
        self.active_only = active_only


@dataclass(frozen=True, slots=True)
class ClientWindows:
    """Per-client window matrices, rows = clients (``client_ids``), columns = windows."""

    client_ids: IntArray
    counts: IntArray  # requests in the window
    dist: npt.NDArray[np.int8]
    shape: FloatArray
    # Windows of the replayed span in which no client of the whole trace has a request: in
    # ServeGen's m-mid these are collection gaps, not idleness (see the trace's README).
    silent_windows: int = 0

    @property
    def n_windows(self) -> int:
        return int(self.counts.shape[1])


def read_trace(path: Path, window_s: float = 600.0) -> ClientWindows:
    """Read a long-format ServeGen window CSV (optionally gzipped); cached per file version."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", key="arrivals.servegen.file") from exc
    return _read_cached(str(path), st.st_mtime_ns, st.st_size, window_s)


Columns = tuple[IntArray, FloatArray, FloatArray, npt.NDArray[np.int8], FloatArray]


@lru_cache(maxsize=4)
def _read_cached(path: str, _mtime_ns: int, _size: int, window_s: float) -> ClientWindows:
    key = "arrivals.servegen.file"
    client, starts, rate, dist, shape = _fast_columns(path) or _csv_columns(path, key)
    window = np.rint(starts / window_s)
    _check_windows(starts, window_s)
    ids, row = np.unique(client, return_inverse=True)
    w = window.astype(np.int64)
    if w.min() < 0:
        raise ConfigError("negative window_start_s in trace", key=key)
    cell = row * (int(w.max()) + 1) + w
    if len(np.unique(cell)) != len(cell):
        dup = int(np.flatnonzero(np.bincount(cell) > 1)[0])
        c, k = divmod(dup, int(w.max()) + 1)
        raise ConfigError(
            f"client {int(ids[c])} has two rows for the window at {k * window_s:g} s", key=key
        )
    n_windows = int(w.max()) + 1
    counts = np.zeros((len(ids), n_windows), dtype=np.int64)
    dists = np.zeros((len(ids), n_windows), dtype=np.int8)
    shapes = np.zeros((len(ids), n_windows), dtype=np.float64)
    counts[row, w] = np.rint(rate * window_s).astype(np.int64)
    dists[row, w] = dist
    shapes[row, w] = shape
    return ClientWindows(client_ids=ids, counts=counts, dist=dists, shape=shapes)


def _fast_columns(path: str) -> Columns | None:
    """The trace's columns read by numpy's C parser (~5x the csv module on the 326,592 rows of
    m-large); None when the file is not a plain CSV of that parser's values (an empty number, a
    quoted field, a row of another length, not UTF-8...): :func:`_csv_columns` then reads it
    and names what is wrong."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        # whole, then parsed from memory: a file object costs a Python call per line
        with opener(path, "rb") as fh:
            text = io.StringIO(fh.read().decode("utf-8"))
        header = text.readline().rstrip("\r\n").split(",")
        if any(c not in header for c in REQUIRED_COLUMNS):
            return None
        types = {"client_id": np.int64, "iat_dist": "U16"}
        dtype = [  # the columns not read (and repeats): any text
            (name, types.get(name, np.float64))
            if name in REQUIRED_COLUMNS and header.index(name) == i
            else (f"_{i}", "U1")
            for i, name in enumerate(header)
        ]
        with warnings.catch_warnings(action="ignore"):  # an empty file: its own error
            rows = np.loadtxt(text, delimiter=",", comments=None, ndmin=1, dtype=dtype)
    except (OSError, EOFError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if len(rows) == 0:
        return None
    kinds = rows["iat_dist"]
    dist = np.full(len(rows), NO_DIST, dtype=np.int8)
    dist[kinds == "Gamma"] = GAMMA
    dist[kinds == "Weibull"] = WEIBULL
    return (
        rows["client_id"].astype(np.int64),
        rows["window_start_s"].astype(np.float64),
        rows["rate_rps"].astype(np.float64),
        dist,
        rows["dist_param1"].astype(np.float64),
    )


def _csv_columns(path: str, key: str) -> Columns:
    """The trace's columns read by the csv module, any CSV; errors name the problem."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            text = io.TextIOWrapper(fh, encoding="utf-8")
            reader = csv.reader(text)
            header = next(reader, None)
            if header is None or any(c not in header for c in REQUIRED_COLUMNS):
                raise ConfigError(f"not a ServeGen window trace: header {header}", key=key)
            cols = list(zip(*reader, strict=True))
    except (OSError, EOFError, csv.Error, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", key=key) from exc
    if not cols:
        raise ConfigError("trace has no rows", key=key)
    col = {name: cols[header.index(name)] for name in REQUIRED_COLUMNS}
    try:
        client = np.asarray(col["client_id"], dtype=np.int64)
        starts = np.asarray(col["window_start_s"], dtype=np.float64)
        rate = np.asarray(col["rate_rps"], dtype=np.float64)
        shape = np.asarray([float(v) if v else 0.0 for v in col["dist_param1"]])
        dist = np.asarray([_DIST_CODES.get(v, NO_DIST) for v in col["iat_dist"]], dtype=np.int8)
    except ValueError as exc:
        raise ConfigError(f"bad value in {path}: {exc}", key=key) from exc
    return client, starts, rate, dist, shape


def _check_windows(starts: FloatArray, window_s: float) -> None:
    """The trace's windows must be ``window_s`` apart: with another spacing, requests per
    window (``rate_rps * window_s``) and window positions would both be wrong, silently."""
    distinct = np.unique(starts)
    if len(distinct) < 2:
        return
    spacing = float(np.min(np.diff(distinct)))
    if not math.isclose(spacing, window_s, rel_tol=1e-6):
        raise ConfigError(
            f"must match the trace's windows, which start {spacing:g} s apart; got {window_s:g}",
            key="arrivals.servegen.window_s",
        )
    off_grid = np.abs(distinct / window_s - np.rint(distinct / window_s)) > 1e-6
    if off_grid.any():
        raise ConfigError(
            f"window_start_s must be multiples of the window ({window_s:g} s), "
            f"got {float(distinct[off_grid][0]):g}",
            key="arrivals.servegen.file",
        )


def select_clients(
    trace: ClientWindows,
    spec: ServeGenSpec,
    *,
    count: int,
    duration_s: float,
    rng: np.random.Generator,
) -> ClientWindows:
    """The replayed span's windows for the chosen clients, busiest (in the span) first."""
    w0 = round(spec.offset_s / spec.window_s)
    n_w = math.ceil(duration_s * spec.time_scale / spec.window_s - 1e-9)
    if w0 + n_w > trace.n_windows:
        raise ConfigError(
            f"offset_s + duration_s * time_scale = {spec.offset_s + duration_s * spec.time_scale:g}"
            f" s exceeds the trace ({trace.n_windows * spec.window_s:g} s)",
            key="duration_s",
        )
    span = trace.counts[:, w0 : w0 + n_w]
    totals = span.sum(axis=1)
    if spec.select == "ids":
        if len(spec.client_ids) != count:
            raise ConfigError(
                f"must equal the number of client_ids ({len(spec.client_ids)})",
                key="adapters.count",
            )
        pos = {int(c): i for i, c in enumerate(trace.client_ids)}
        missing = [c for c in spec.client_ids if c not in pos]
        if missing:
            raise ConfigError(
                f"not in the trace: {missing[:5]}", key="arrivals.servegen.client_ids"
            )
        rows = np.array([pos[c] for c in spec.client_ids], dtype=np.int64)
    else:
        if count > len(trace.client_ids):
            raise TooFewClientsError(
                available=len(trace.client_ids), trace=spec.file, active_only=False
            )
        if spec.select == "top":
            rows = np.argsort(-totals, kind="stable")[:count]
        else:
            active = np.nonzero(totals > 0)[0]
            if count > len(active):
                raise TooFewClientsError(available=len(active), trace=spec.file, active_only=True)
            rows = np.sort(rng.choice(active, size=count, replace=False))
    rows = rows[np.argsort(-totals[rows], kind="stable")]
    sl = slice(w0, w0 + n_w)
    return ClientWindows(
        client_ids=trace.client_ids[rows],
        counts=trace.counts[rows, sl],
        dist=trace.dist[rows, sl],
        shape=trace.shape[rows, sl],
        silent_windows=int((span.sum(axis=0) == 0).sum()),
    )


class ServeGenSource:
    """Arrivals (simulated time) window by window for the selected clients (stream = row)."""

    __slots__ = ("_clients", "_duration_s", "_rate_scale", "_rng", "_window_sim_s")

    def __init__(
        self,
        clients: ClientWindows,
        spec: ServeGenSpec,
        *,
        duration_s: float,
        rng: np.random.Generator,
    ) -> None:
        self._clients = clients
        self._window_sim_s = spec.window_s / spec.time_scale
        self._rate_scale = spec.rate_scale
        self._duration_s = duration_s
        self._rng = rng

    @property
    def window_sim_s(self) -> float:
        return self._window_sim_s

    def mean_rates_rps(self) -> FloatArray:
        """Expected requests per simulated second of each client over the run."""
        c = self._clients.counts.astype(np.float64)
        # The last window may be cut by duration_s.
        full = np.minimum(
            1.0,
            (self._duration_s - np.arange(c.shape[1]) * self._window_sim_s) / self._window_sim_s,
        )
        return np.asarray(
            (c * np.clip(full, 0.0, 1.0)).sum(axis=1) * self._rate_scale / self._duration_s,
            dtype=np.float64,
        )

    def window(self, j: int) -> tuple[FloatArray, IntArray]:
        """Arrivals of window ``j`` (unsorted), cut at ``duration_s``."""
        c = self._clients
        n = c.counts[:, j].astype(np.float64) * self._rate_scale
        if self._rate_scale != 1.0:
            base = np.floor(n)
            n = base + (self._rng.random(len(n)) < (n - base))
        counts = n.astype(np.int64)
        t0 = j * self._window_sim_s
        times: list[FloatArray] = []
        streams: list[IntArray] = []
        kinds = c.dist[:, j]
        shapes = c.shape[:, j]
        valid = np.isfinite(shapes) & (shapes > 0)
        for kind in (GAMMA, WEIBULL, NO_DIST):
            if kind == NO_DIST:  # no fitted law (or unusable one): exponential gaps
                rows = np.nonzero((counts > 0) & ((kinds == NO_DIST) | ~valid))[0]
            else:
                rows = np.nonzero((counts > 0) & (kinds == kind) & valid)[0]
            if len(rows) == 0:
                continue
            frac = self._fractions(kind, shapes[rows], counts[rows])
            times.append(t0 + frac * self._window_sim_s)
            streams.append(np.repeat(rows.astype(np.int64), counts[rows]))
        if not times:
            return np.empty(0), np.empty(0, dtype=np.int64)
        t = np.concatenate(times)
        s = np.concatenate(streams)
        keep = t < self._duration_s
        return t[keep], s[keep]

    def _fractions(self, kind: int, shapes: FloatArray, counts: IntArray) -> FloatArray:
        """For each row, ``count`` positions in (0, 1): partial sums of ``count + 1`` gaps."""
        sizes = counts + 1
        rep = np.repeat(shapes, sizes)
        if kind == GAMMA:
            gaps = self._rng.gamma(rep, 1.0)
        elif kind == WEIBULL:
            gaps = self._rng.weibull(rep)
        else:
            gaps = self._rng.exponential(1.0, size=int(sizes.sum()))
        ends = np.cumsum(sizes)
        starts = ends - sizes
        cs = np.cumsum(gaps)
        before = cs[starts] - gaps[starts]
        total = cs[ends - 1] - before
        rel = cs - np.repeat(before, sizes)
        keep = np.ones(len(gaps), dtype=bool)
        keep[ends - 1] = False  # the last partial sum is the window end
        denom = np.repeat(np.where(total > 0, total, 1.0), sizes)
        frac = rel / denom
        degenerate = np.repeat(total <= 0, sizes)
        if degenerate.any():  # all gaps underflowed to 0: spread uniformly
            frac[degenerate] = self._rng.random(int(degenerate.sum()))
        return np.asarray(np.clip(frac[keep], 0.0, np.nextafter(1.0, 0.0)), dtype=np.float64)
