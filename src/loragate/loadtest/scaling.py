"""Scale a workload spec's request rate, keeping its shape in time.

Every rate the spec states is multiplied by one factor: the mean rate (``rate_rps``), both
on/off phases, explicit per-adapter rates, and a ServeGen replay's ``rate_scale``. Diurnal
periods, burst lengths, popularity and lengths are unchanged, so ``--rate-scale 0.1`` replays the
same day at a tenth of the traffic.
"""

from __future__ import annotations

import math
from dataclasses import replace

from loragate.core.errors import ConfigError
from loragate.workload import WorkloadSpec


def scale_rates(spec: WorkloadSpec, factor: float) -> WorkloadSpec:
    """``spec`` with every request rate multiplied by ``factor`` (> 0)."""
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"must be > 0, got {factor:g}", key="--rate-scale")
    arr = spec.arrivals
    onoff = arr.onoff
    if onoff is not None:
        onoff = replace(
            onoff,
            on_rate_rps=onoff.on_rate_rps * factor,
            off_rate_rps=onoff.off_rate_rps * factor,
        )
    servegen = arr.servegen
    if servegen is not None:
        servegen = replace(servegen, rate_scale=servegen.rate_scale * factor)
    arrivals = replace(
        arr,
        rate_rps=None if arr.rate_rps is None else arr.rate_rps * factor,
        onoff=onoff,
        servegen=servegen,
    )
    items = tuple(
        it if it.rate_rps is None else replace(it, rate_rps=it.rate_rps * factor)
        for it in spec.adapters.items
    )
    return replace(spec, arrivals=arrivals, adapters=replace(spec.adapters, items=items))
