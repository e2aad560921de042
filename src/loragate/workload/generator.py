"""A workload spec -> a deterministic, lazily generated, time-sorted request stream.

    wl = Workload(load_spec("workload/zipf-200.yaml"))
    wl.adapters                      # tuple[AdapterSpec, ...] (name, path, rank)
    for req in wl.requests():        # WorkloadRequest(t_s, adapter, rank, prompt_tokens, ...)
        ...
    for batch in wl.batches():       # the same stream as numpy arrays, one chunk at a time
        ...

Generation is chunked (about 50k arrivals or 600 s per chunk), vectorised with numpy, and uses
independent random streams (spawned from ``spec.seed``) for structure, arrivals and lengths, so
every call of :meth:`Workload.batches` / :meth:`Workload.requests` yields the identical stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.core.types import AdapterSpec
from loragate.workload._reader import naming_file
from loragate.workload.arrivals import (
    AggregateGammaSource,
    GammaRenewalSource,
    PoissonSource,
    Source,
    chunk_length_s,
)
from loragate.workload.lengths import PairSampler, mean_length
from loragate.workload.modulation import Modulation
from loragate.workload.popularity import assign_ranks, popularity_weights
from loragate.workload.servegen import ClientWindows, ServeGenSource, read_trace, select_clients
from loragate.workload.spec import WorkloadSpec

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

BASE = -1  # adapter_index of a base-model request
MAX_REQUESTS = 50_000_000  # expected requests of one run (bounds memory and run time)


class WorkloadRequest(NamedTuple):
    """One request of the stream. ``adapter`` None = base model (``rank`` 0)."""

    t_s: float
    adapter: str | None
    rank: int
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class RequestBatch:
    """A time-sorted chunk of the stream as arrays; ``adapter_index`` -1 = base model."""

    t_s: FloatArray
    adapter_index: IntArray
    prompt_tokens: IntArray
    max_tokens: IntArray

    def __len__(self) -> int:
        return len(self.t_s)


class Workload:
    """The generator for one :class:`WorkloadSpec` (adapters fixed at construction)."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        # A problem found only now (e.g. a ServeGen trace shorter than the run) names the file.
        with naming_file(spec.source, spec.key_lines) if spec.source else nullcontext():
            self._build(spec)

    def _build(self, spec: WorkloadSpec) -> None:
        seeds = np.random.SeedSequence(spec.seed).spawn(3)
        self._arrival_seed, self._length_seed = seeds[1], seeds[2]
        structure = np.random.default_rng(seeds[0])
        a = spec.adapters
        self._clients: ClientWindows | None = None
        sg = spec.arrivals.servegen
        if sg is not None:
            self._clients = select_clients(
                read_trace(sg.file, sg.window_s),
                sg,
                count=a.count,
                duration_s=spec.duration_s,
                rng=structure,
            )
            names = [
                a.name_pattern.format(i=i, client=int(c))
                for i, c in enumerate(self._clients.client_ids)
            ]
            ranks = assign_ranks(a.ranks, a.count, structure)
        elif a.items:
            names = [it.name for it in a.items]
            ranks = np.array([it.rank for it in a.items], dtype=np.int64)
        else:
            names = [a.name_pattern.format(i=i) for i in range(a.count)]
            ranks = assign_ranks(a.ranks, a.count, structure)
        self.adapter_names: tuple[str, ...] = tuple(names)
        self.ranks: IntArray = ranks
        self.adapters: tuple[AdapterSpec, ...] = tuple(
            AdapterSpec(name=n, path=a.path_pattern.format(name=n), rank=int(r))
            for n, r in zip(names, ranks, strict=True)
        )
        self._stream_rates = self._rates(structure)
        arr = spec.arrivals
        self._modulation = Modulation(
            diurnal=arr.diurnal,
            onoff=arr.onoff,
            duration_s=spec.duration_s,
            rng=np.random.default_rng(structure.integers(2**63)),
        )
        # Realised mean of the rate multiplier over the run (1 for whole diurnal periods;
        # the drawn schedule for exponential on/off phases).
        self._mod_mean = 1.0
        if self._clients is None and not self._modulation.is_identity:
            self._mod_mean = self._modulation.integral(0.0, spec.duration_s) / spec.duration_s
        expected = self.offered_rate_rps * spec.duration_s
        if expected > MAX_REQUESTS:
            raise ConfigError(
                f"about {expected:.3g} requests ({self.offered_rate_rps:g} req/s for "
                f"{spec.duration_s:g} s), more than a run may have ({MAX_REQUESTS:,}): "
                "lower the rate or duration_s",
                key="arrivals",
            )
        # Things worth telling whoever runs the spec (not errors): one line each.
        self.notes: tuple[str, ...] = ()
        if self._clients is not None and self._clients.silent_windows:
            assert sg is not None
            self.notes = (
                f"{self._clients.silent_windows} of the {self._clients.n_windows} replayed "
                f"{sg.window_s:g} s windows of {sg.file.name} have no request from any client "
                "(collection gaps in some traces): no arrivals then",
            )
        self._names_lookup: list[str | None] = [*names, None]
        self._ranks_lookup: list[int] = [*ranks.tolist(), 0]

    # --- expected load ----------------------------------------------------------------------

    def _rates(self, structure: np.random.Generator) -> FloatArray:
        """Mean rate of each stream (adapters, then the base model if base_fraction > 0)."""
        spec = self.spec
        a = spec.adapters
        if self._clients is not None:
            assert spec.arrivals.servegen is not None
            src = ServeGenSource(
                self._clients, spec.arrivals.servegen, duration_s=spec.duration_s, rng=structure
            )
            return src.mean_rates_rps()
        if a.items and a.items[0].rate_rps is not None:
            rates = np.array([it.rate_rps or 0.0 for it in a.items], dtype=np.float64)
            base = rates.sum() * a.base_fraction / (1.0 - a.base_fraction)
        else:
            arr = spec.arrivals
            total = arr.onoff.mean_rate_rps if arr.onoff is not None else arr.rate_rps
            assert total is not None
            w = popularity_weights(a.popularity, a.count, structure)
            rates = w * total * (1.0 - a.base_fraction)
            base = total * a.base_fraction
        return np.concatenate([rates, [base]]) if a.base_fraction > 0 else rates

    @property
    def mean_rates_rps(self) -> FloatArray:
        """Mean request rate of each adapter over the run (requests per simulated second)."""
        return self._stream_rates[: len(self.adapter_names)] * self._mod_mean

    @property
    def base_rate_rps(self) -> float:
        n = len(self.adapter_names)
        return float(self._stream_rates[n]) * self._mod_mean if len(self._stream_rates) > n else 0.0

    @property
    def offered_rate_rps(self) -> float:
        return float(self._stream_rates.sum()) * self._mod_mean

    @property
    def mean_prompt_tokens(self) -> float:
        return mean_length(self.spec.lengths.prompt)

    @property
    def mean_output_tokens(self) -> float:
        return mean_length(self.spec.lengths.output)

    # --- the stream ---------------------------------------------------------------------------

    def batches(self) -> Iterator[RequestBatch]:
        """The stream as time-sorted numpy chunks (identical on every call)."""
        lengths = PairSampler(self.spec.lengths)
        len_rng = np.random.default_rng(self._length_seed)
        n_adapters = len(self.adapter_names)
        for times, streams in self._arrival_chunks():
            if len(times) == 0:
                continue
            order = np.argsort(times, kind="stable")
            t = times[order]
            idx = streams[order]
            idx = np.where(idx >= n_adapters, BASE, idx)
            prompt, output = lengths.sample(len_rng, len(t))
            yield RequestBatch(t_s=t, adapter_index=idx, prompt_tokens=prompt, max_tokens=output)

    def requests(self) -> Iterator[WorkloadRequest]:
        """The stream one request at a time (identical on every call)."""
        names = self._names_lookup
        ranks = self._ranks_lookup
        for b in self.batches():
            idx = b.adapter_index.tolist()
            yield from map(
                WorkloadRequest,
                b.t_s.tolist(),
                [names[i] for i in idx],
                [ranks[i] for i in idx],
                b.prompt_tokens.tolist(),
                b.max_tokens.tolist(),
            )

    __iter__ = requests

    def _arrival_chunks(self) -> Iterator[tuple[FloatArray, IntArray]]:
        spec = self.spec
        rng = np.random.default_rng(self._arrival_seed)
        sg = spec.arrivals.servegen
        if self._clients is not None and sg is not None:
            src = ServeGenSource(self._clients, sg, duration_s=spec.duration_s, rng=rng)
            for j in range(self._clients.n_windows):
                yield src.window(j)
            return
        yield from self._synthetic_chunks(rng)

    def _synthetic_chunks(self, rng: np.random.Generator) -> Iterator[tuple[FloatArray, IntArray]]:
        spec = self.spec
        arr = spec.arrivals
        rates = self._stream_rates
        source: Source
        if arr.process == "gamma" and arr.scope == "per_adapter":
            source = GammaRenewalSource(rates, arr.cv, rng)
        elif arr.process == "gamma":
            source = AggregateGammaSource(rates, arr.cv, rng)
        else:
            source = PoissonSource(rates, rng)
        mod = self._modulation
        identity = mod.is_identity
        peak = rates.sum() * (1.0 + (arr.diurnal.amplitude if arr.diurnal else 0.0))
        if arr.onoff is not None:
            peak = max(peak, arr.onoff.on_rate_rps, arr.onoff.off_rate_rps)
        chunk_s = min(chunk_length_s(float(peak)), mod.max_span_s)
        t0 = 0.0
        u0 = 0.0
        while t0 < spec.duration_s:
            t1 = min(spec.duration_s, t0 + chunk_s)
            if identity:
                times, streams = source.draw(t0, t1)
            else:
                grid_t, grid_u = mod.grid(t0, t1)
                grid_u = grid_u + u0
                u1 = float(grid_u[-1])
                us, streams = source.draw(u0, u1)
                times = np.interp(us, grid_u, grid_t)
                u0 = u1
            yield times, streams
            t0 = t1
