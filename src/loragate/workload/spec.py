"""Workload spec value types (frozen). Parsing and validation live in :mod:`.parse`.

A spec says which adapters exist and how popular they are, how requests arrive over time, how
long prompts and outputs are, for how long, and with which seed. The same spec drives the load
tester against live systems and ``loragate simulate`` in virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loragate.workload.yaml_file import NO_LINES, KeyLines

# --- popularity: how the total rate is split over adapters ------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UniformPopularity:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ZipfPopularity:
    """Adapter ``i`` (0-based, in name order) gets a share proportional to ``1 / (i + 1) ** s``."""

    s: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DirichletPopularity:
    """Shares drawn once (from the seed) from a symmetric Dirichlet(alpha); small alpha = skewed."""

    alpha: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplicitPopularity:
    """Relative weights, one per adapter (normalised)."""

    weights: tuple[float, ...]


Popularity = UniformPopularity | ZipfPopularity | DirichletPopularity | ExplicitPopularity


@dataclass(frozen=True, slots=True, kw_only=True)
class ExplicitAdapter:
    name: str
    rank: int
    rate_rps: float | None = None  # None: share comes from ``popularity``


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptersSpec:
    """``count`` adapters named by ``name_pattern`` (``str.format`` with ``i`` and, for ServeGen
    replay, ``client``), ranks assigned in exact proportion to ``ranks`` and shuffled by the seed;
    or an explicit ``items`` list. ``base_fraction`` of all requests go to the base model."""

    count: int
    name_pattern: str = "adapter-{i:03d}"
    path_pattern: str = "adapters/{name}"
    ranks: tuple[tuple[int, float], ...] = ((8, 1.0),)
    popularity: Popularity = UniformPopularity()
    base_fraction: float = 0.0
    items: tuple[ExplicitAdapter, ...] = ()


# --- arrivals -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DiurnalSpec:
    """Rate multiplier ``1 + amplitude * sin(2 pi (t - phase_s) / period_s)`` (mean 1)."""

    period_s: float = 86_400.0
    amplitude: float = 0.5
    phase_s: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class OnOffSpec:
    """Alternating bursts: total rate ``on_rate_rps`` for ``on_s``, then ``off_rate_rps`` for
    ``off_s``. ``durations: exponential`` draws each phase length with that mean."""

    on_s: float
    off_s: float
    on_rate_rps: float
    off_rate_rps: float = 0.0
    durations: Literal["fixed", "exponential"] = "fixed"
    start: Literal["on", "off"] = "on"

    @property
    def mean_rate_rps(self) -> float:
        return (self.on_s * self.on_rate_rps + self.off_s * self.off_rate_rps) / (
            self.on_s + self.off_s
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeGenSpec:
    """Replay of ServeGen per-client window traces: client -> adapter.

    Trace time ``offset_s + t * time_scale`` is simulated time ``t``. Clients are the
    ``adapters.count`` busiest within the replayed span (``select: top``), a seeded sample of the
    clients active in it (``sample``), or the listed ``client_ids``. Each window's request count
    (``rate_rps * window``, times ``rate_scale``) is placed inside the window by drawing
    inter-arrival times from the window's fitted Gamma/Weibull law and rescaling them to the
    window (as ServeGen's own generator does).
    """

    file: Path
    select: Literal["top", "sample", "ids"] = "top"
    client_ids: tuple[int, ...] = ()
    offset_s: float = 0.0
    time_scale: float = 1.0
    rate_scale: float = 1.0
    window_s: float = 600.0


ProcessName = Literal["poisson", "gamma", "servegen"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ArrivalsSpec:
    """``rate_rps`` is the mean total rate (None when set by ``onoff``, explicit per-adapter
    rates or a ServeGen replay). ``scope`` applies to ``gamma``: ``per_adapter`` makes each adapter
    its own renewal process with this CV; ``aggregate`` makes the total stream one renewal
    process whose arrivals are assigned to adapters by popularity."""

    process: ProcessName = "poisson"
    rate_rps: float | None = None
    cv: float = 1.0
    scope: Literal["per_adapter", "aggregate"] = "per_adapter"
    diurnal: DiurnalSpec | None = None
    onoff: OnOffSpec | None = None
    servegen: ServeGenSpec | None = None


# --- lengths ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FixedLength:
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UniformLength:
    min: int
    max: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LognormalLength:
    """Lognormal with arithmetic mean ``mean`` and log-space ``sigma``, rounded and clipped to
    ``[min, max]`` (clipping moves the mean slightly)."""

    mean: float
    sigma: float
    min: int = 1
    max: int = 1_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class EmpiricalLength:
    """Draw from observed values (inline or loaded from a file at parse time)."""

    values: tuple[int, ...]
    weights: tuple[float, ...] = ()
    source: str = "inline"


LengthDist = FixedLength | UniformLength | LognormalLength | EmpiricalLength


@dataclass(frozen=True, slots=True, kw_only=True)
class LengthsSpec:
    prompt: LengthDist = FixedLength(value=256)
    output: LengthDist = FixedLength(value=128)
    max_total_tokens: int | None = None  # clip prompt + output to fit a model length


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSpec:
    name: str
    adapters: AdaptersSpec
    arrivals: ArrivalsSpec
    lengths: LengthsSpec
    duration_s: float
    seed: int = 0
    description: str = ""
    source: str = ""  # the file it was read from ("" when built in code); errors name it
    # Where each key is written in that file, for errors found later (building the Workload).
    key_lines: KeyLines = field(default_factory=lambda: NO_LINES, compare=False, repr=False)
