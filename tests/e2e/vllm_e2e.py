"""Shared constants for the real-vLLM end-to-end tests (a module with a unique name, so test
files can import it; ``conftest`` is not importable unambiguously)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))

from vllm_cpu.replica import SERVED_NAME, ReplicaConfig  # noqa: E402

BASE = SERVED_NAME
# The replica the recorded transcripts used (shared/design/VLLM_API.md §3), with small KV.
REAL_CONFIG = ReplicaConfig(
    max_loras=2,
    max_cpu_loras=4,
    max_lora_rank=16,
    max_num_seqs=16,
    kv_cache_bytes="64M",
    omp_bind="0",
    server_load_tracking=False,
    prefix_caching=True,
)
