"""Workload specs (YAML) and deterministic request-stream generators.

See :mod:`loragate.workload.parse` for the spec format and :mod:`loragate.workload.generator`
for the stream API. Imports only ``loragate.core``, the standard library, numpy and PyYAML.
"""

from loragate.workload._reader import SpecFileError
from loragate.workload.generator import BASE, RequestBatch, Workload, WorkloadRequest
from loragate.workload.parse import load_spec, parse_spec_text, spec_from_mapping
from loragate.workload.spec import WorkloadSpec

__all__ = [
    "BASE",
    "RequestBatch",
    "SpecFileError",
    "Workload",
    "WorkloadRequest",
    "WorkloadSpec",
    "load_spec",
    "parse_spec_text",
    "spec_from_mapping",
]
