"""Sizing: one simulation per point of a grid of replica counts and LoRA cache sizes, and the
smallest point that meets a TTFT SLO (``loragate simulate --sweep``).

Every point replays the same request stream (the workload's seed) through its own deployment,
so the points differ only by their settings, and a point's summary is exactly that of a single
``loragate simulate`` run with the same flags. Points run in a process pool (``jobs``); the
results do not depend on it.

A point *meets* the target when its SLO attainment (the share of all requests with a first token
within ``ttft_slo_ms``; rejected and unfinished ones count as misses) is at least the target and
its throughput is not starved (:mod:`loragate.simulate.summary`). The *smallest* meeting point
has the fewest replicas (GPUs cost most), then the fewest LoRA slots (``max_loras``: KV
memory), then the smallest CPU cache (``max_cpu_loras``: host memory).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass
from typing import Any

from loragate.core.errors import ConfigError
from loragate.core.process_pool import WorkerPool, stop_pool
from loragate.simulate.config import SimulationConfig
from loragate.simulate.runner import Simulation
from loragate.workload import Workload, WorkloadSpec

# What a sweep may vary, in the order the smallest point is chosen by.
AXES = ("replicas", "max_loras", "max_cpu_loras")
# At most this many simulations in one sweep (each is bounded by its workload and drain_s).
MAX_POINTS = 64


@dataclass(frozen=True, slots=True, order=True)
class Point:
    replicas: int
    max_loras: int
    max_cpu_loras: int

    def label(self) -> str:
        replicas = "1 replica" if self.replicas == 1 else f"{self.replicas} replicas"
        return f"{replicas}, max_loras {self.max_loras}, max_cpu_loras {self.max_cpu_loras}"


class PointConfigError(ConfigError):
    """A point of the grid whose settings a single run would refuse (``cause``)."""

    def __init__(self, point: Point, cause: ConfigError) -> None:
        super().__init__(f"at {point.label()}: {cause}")
        self.point = point
        self.cause = cause


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which ``loragate simulate`` handles as one) stopped
    :func:`run_points`: ``done`` holds the points that had finished, as (index in the grid,
    summary), in grid order. ``result``: what the command makes of them to print."""

    def __init__(self, done: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self.done = done
        self.result: dict[str, Any] | None = None


def parse_axes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["replicas=2,4,6", "max_loras=8,16"]`` -> ``{"replicas": (2, 4, 6), ...}``."""
    axes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, listed = value.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in AXES:
            raise ConfigError(
                f"expected NAME=V1,V2,... with NAME one of {', '.join(AXES)}, got {value!r}",
                key="--sweep",
            )
        if name in axes:
            raise ConfigError(f"{name} is given twice", key="--sweep")
        try:
            numbers = [int(v) for v in listed.split(",")]
        except ValueError:
            raise ConfigError(
                f"{name}: expected integers separated by commas, got {listed!r}", key="--sweep"
            ) from None
        if any(n < 1 for n in numbers):
            raise ConfigError(f"{name}: every value must be >= 1, got {listed}", key="--sweep")
        if len(set(numbers)) != len(numbers):
            raise ConfigError(f"{name}: a value is given twice in {listed}", key="--sweep")
        axes[name] = tuple(sorted(numbers))
    return axes


def grid(axes: dict[str, tuple[int, ...]], base: SimulationConfig) -> tuple[list[Point], int]:
    """The points of the grid (``base``'s value on an axis not swept), smallest first, and how
    many combinations were left out because vLLM refuses ``max_cpu_loras < max_loras``."""
    values = {
        "replicas": axes.get("replicas", (base.replicas,)),
        "max_loras": axes.get("max_loras", (base.engine.max_loras,)),
        "max_cpu_loras": axes.get("max_cpu_loras", (base.engine.max_cpu_loras,)),
    }
    size = len(values["replicas"]) * len(values["max_loras"]) * len(values["max_cpu_loras"])
    if size > MAX_POINTS:
        raise ConfigError(f"{size} points, more than a sweep may run ({MAX_POINTS})", key="--sweep")
    points = [
        Point(replicas=r, max_loras=g, max_cpu_loras=c)
        for r in values["replicas"]
        for g in values["max_loras"]
        for c in values["max_cpu_loras"]
        if c >= g
    ]
    if not points:
        raise ConfigError(
            f"every point has max_cpu_loras < max_loras, which vLLM refuses (max_loras "
            f"{','.join(map(str, values['max_loras']))}, max_cpu_loras "
            f"{','.join(map(str, values['max_cpu_loras']))}): raise --max-cpu-loras or sweep it",
            key="--sweep",
        )
    return points, size - len(points)


def config_at(base: SimulationConfig, point: Point) -> SimulationConfig:
    engine = dataclasses.replace(
        base.engine, max_loras=point.max_loras, max_cpu_loras=point.max_cpu_loras
    )
    return dataclasses.replace(base, replicas=point.replicas, engine=engine)


def _run_point(job: tuple[WorkloadSpec, SimulationConfig]) -> dict[str, Any]:
    """One point, in a worker process (module level: pickled by name)."""
    spec, config = job
    return Simulation(Workload(spec), config).run().summary


def _picklable(spec: WorkloadSpec) -> WorkloadSpec:
    """``spec`` with its key -> line map as a dict (pickle refuses the read-only mapping)."""
    return dataclasses.replace(spec, key_lines=dict(spec.key_lines))


Progress = Callable[[int, int, Point, float], None]


def prepare(
    workload: Workload, base: SimulationConfig, points: Sequence[Point]
) -> list[Simulation]:
    """One simulation per point, its settings checked (KV cache size, ranks, ...) before any
    point runs: a point a single run would refuse raises :class:`PointConfigError`."""
    sims = []
    for point in points:
        try:
            sims.append(Simulation(workload, config_at(base, point)))
        except ConfigError as exc:
            raise PointConfigError(point, exc) from exc
    return sims


def run_points(
    sims: list[Simulation],
    points: Sequence[Point],
    *,
    jobs: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Every point's summary, in the order of ``points`` (``sims`` from :func:`prepare`,
    emptied as they run); ``jobs`` 0 = one worker per core. A ``KeyboardInterrupt`` (the
    workers stopped) is raised as :class:`SweepInterrupted` with the points done by then."""
    out: list[dict[str, Any] | None] = [None] * len(points)
    workers = min(jobs if jobs > 0 else (os.cpu_count() or 1), len(points))
    started = time.perf_counter()

    def done(n: int, i: int) -> None:
        if progress is not None:
            progress(n, len(points), points[i], time.perf_counter() - started)

    jobs_in = [(_picklable(sim.workload.spec), sim.config) for sim in sims]
    pending = sims[::-1]
    sims.clear()  # a point's engines are freed once it has run
    try:
        if workers <= 1:
            for i in range(len(points)):
                out[i] = pending.pop().run().summary
                done(i + 1, i)
        else:
            pending.clear()  # each worker builds its own
            pool = WorkerPool(workers)
            try:
                futures = {pool.submit(_run_point, job): i for i, job in enumerate(jobs_in)}
                for n, future in enumerate(as_completed(futures), start=1):
                    i = futures[future]
                    out[i] = future.result()
                    done(n, i)
            except BaseException:  # Ctrl-C, or a worker died: stop the others now
                stop_pool(pool)
                raise
            pool.shutdown()
    except KeyboardInterrupt as exc:
        raise SweepInterrupted([(i, s) for i, s in enumerate(out) if s is not None]) from exc
    return [s for s in out if s is not None]


def meets(summary: dict[str, Any], attainment: float) -> bool:
    att = summary["slo"]["attainment"]
    return att is not None and att >= attainment and not summary["starved"]


def smallest(
    points: Sequence[Point], summaries: Sequence[dict[str, Any]], attainment: float
) -> Point | None:
    ok = [p for p, s in zip(points, summaries, strict=True) if meets(s, attainment)]
    return min(ok) if ok else None
