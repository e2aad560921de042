"""Scale a workload spec's request rate, keeping its shape in time: ``--rate-scale`` and
``--rate-rps`` of ``loragate loadtest`` (and ``loragate simulate``'s ``--rate-rps``). The one
implementation is :func:`loragate.workload.overrides.scale_rates`."""

from __future__ import annotations

from loragate.workload.overrides import scale_rates

__all__ = ["scale_rates"]
