"""The step-time model routing uses, behind a small protocol so routing never imports the twin.

The twin's performance profiles satisfy ``StepTimeModel`` (the gateway or simulator passes one to
``build_policy``). Without one, ``LinearStepTimeModel`` is used: the functional form of Agulló et
al. (arXiv 2508.08343, §"step time"; see shared/design/DIGITAL_TWIN.md)

    t_step = (c1 * B + c2) * (k1 * A + k2) / 100   [ms]

with their Llama-3.1-8B / H100 coefficients, plus a constant CPU->GPU load time and a disk->CPU
load time (their twin assumed disk loads free; real first loads cost ~100-500 ms for rank 8-32 on
a 7B model, so we charge one, scaled by rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class StepTimeModel(Protocol):
    """How long one engine step and one adapter load take on a replica."""

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        """Seconds for one decode step with ``batch_size`` running requests of
        ``distinct_adapters`` different adapters."""
        ...

    def load_s(self, rank: int, from_disk: bool) -> float:
        """Seconds to bring an adapter of ``rank`` into a GPU slot (from the CPU cache, or from
        disk when ``from_disk``)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearStepTimeModel:
    """Agulló et al.'s step-time form; defaults are their Llama-3.1-8B H100 coefficients."""

    c1: float = 0.0438
    c2: float = 10.54
    k1: float = 1.93
    k2: float = 200.0
    # CPU->GPU slot load, ms (Llama: 6.4-8.1 ms by rank 8..32 in the paper's measurements).
    gpu_load_ms_base: float = 6.0
    gpu_load_ms_per_rank: float = 0.07
    # Disk->CPU load, ms (DIGITAL_TWIN.md: ~100-500 ms for rank 8-32 on a 7B model).
    disk_load_ms_base: float = 0.0
    disk_load_ms_per_rank: float = 13.0

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        b = batch_size if batch_size > 0 else 1
        return (self.c1 * b + self.c2) * (self.k1 * distinct_adapters + self.k2) / 100.0 / 1000.0

    def load_s(self, rank: int, from_disk: bool) -> float:
        ms = self.gpu_load_ms_base + self.gpu_load_ms_per_rank * rank
        if from_disk:
            ms += self.disk_load_ms_base + self.disk_load_ms_per_rank * rank
        return ms / 1000.0


def prefill_token_s(model: StepTimeModel) -> float:
    """Seconds one more prompt token adds to a step, if the model says so (optional method
    ``prefill_token_s()``); 0 for models that, like Agulló et al.'s, leave prefill out."""
    fn = getattr(model, "prefill_token_s", None)
    if fn is None:
        return 0.0
    value = float(fn())
    return value if value > 0.0 else 0.0
