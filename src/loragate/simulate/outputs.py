"""What ``loragate simulate --out DIR`` writes there, and how a run owns those files.

Files
-----
A run writes ``records.csv`` or ``records.jsonl`` (``--records``; one row per request, written
as requests finish) and, once the run is complete, ``summary.json``. A directory with records
but no ``summary.json`` holds an interrupted run: its records are incomplete.

A run owns these three names in ``DIR`` (:data:`OUTPUT_NAMES`) and nothing else there. If any
of them is left from an earlier run, the run refuses to start (exit 2) unless given
``--overwrite``; then it removes all three before it writes anything, so the directory never
holds one run's summary beside another's records, or a jsonl and a csv from two runs. Other
files in ``DIR`` are never touched.

``summary.json`` (``schema_version`` 1; a field that changes meaning or goes away raises it,
added fields do not). Times in seconds unless named ``_ms``; rates per second of the workload
window ``[0, duration_s]``.

- ``schema_version``, ``loragate_version``
- ``requests``: ``total``, ``ok``, ``rejected``, ``unfinished`` (still running when
  ``drain_s`` ran out), ``rejected_by_reason`` (``context_length``, ``invalid_request``,
  ``no_replica`` -> count)
- ``duration_s``: the workload window; ``makespan_s``: the last finish
- ``throughput``: ``requests_per_s`` (finished inside the window), ``arrivals_per_s``,
  ``offered_tokens_per_s`` (``max_tokens`` of the requests that arrived, refused-as-invalid
  ones left out), ``achieved_tokens_per_s`` (output tokens emitted inside the window),
  ``output_tokens_total``
- ``starved``: the cluster's throughput is starved: achieved < 0.9 x offered token throughput
  (the seed paper's criterion; false while the throughput keeps up even if requests starve);
  ``starvation``: ``wait_s`` (``--starvation-wait-s``), ``requests`` (first token after more
  than ``wait_s``, or never), ``fraction`` (of ``requests.total``), ``adapters`` (how many
  adapters those belong to; ``""`` is the base model), ``worst_adapters`` (the 5 with most)
- ``ttft_s``, ``itl_s`` (mean inter-token latency per request), ``e2e_s``: ``mean``, ``p50``,
  ``p90``, ``p99``, ``max`` over the ``ok`` requests (null when there are none)
- ``slo``: ``ttft_ms`` and ``attainment`` (share of all requests with a first token within it;
  rejected and unfinished requests count as misses)
- ``deferred``: ``requests`` that waited because every LoRA slot was taken, ``fraction`` (of
  the ``ok`` requests), ``total_s`` of waiting, ``share_of_ttft`` (that waiting over the ``ok``
  requests' summed TTFT; at least 0.5 without throughput starvation: slot-bound, see
  :mod:`loragate.simulate.summary`); ``preemptions``
- ``routed_per_replica`` (requests), ``adapters_per_replica`` (distinct adapters routed there)
- ``replicas``: per replica id, ``loads_from_disk``, ``loads_from_memory`` (CPU cache -> GPU
  slot), ``adapter_loads`` (their sum), ``preemptions``, ``gpu_adapters`` (in its GPU slots at
  the end) and ``shadow_gpu_adapters`` (what the gateway's shadow residency believed)
- ``config``: ``workload`` (the spec's name) and ``workload_file``; ``workload_overrides``
  (what the command line changed in the spec, null when not given: ``rate_rps`` (``--rate-rps``),
  ``adapters`` (``--adapters``), ``duration_s``, ``seed``); ``replicas``; ``profile``;
  ``policy`` (the policy's name, ``custom`` for a composition without ``name:``) and
  ``policy_file`` (null for a built-in name); ``routing``: ``section`` (the routing section
  run: a name, or the mapping with its parameters as written), ``sha256`` (what
  ``loragate_config_info{sha256}`` shows for a gateway whose ``routing:`` is that section, see
  :mod:`loragate.routing.resolved`) and ``parameters`` (every parameter as run, defaults
  filled in: ``{policy, params}``, or ``{name, filters, scorers, picker}`` for a composition,
  see :mod:`loragate.routing.resolved`; equal for ``--policy loragate`` and a file with the
  defaults, whose sections differ, and so are their sha256); ``seed``; ``engine``: every replica's
  ``max_loras``, ``max_cpu_loras``, ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``,
  ``max_lora_rank`` (as run: the workload's if not given), ``kv_capacity_tokens`` (as run, in
  whole 16-token blocks) and ``kv_capacity_from`` (``given``: ``--kv-capacity-tokens``, or
  ``profile``: its KV memory model); ``scrape_interval_s``, ``drain_s``, ``ttft_slo_ms``,
  ``starvation_wait_s``; ``adapters`` (in the workload as run), ``offered_rate_rps`` (the spec's
  mean total rate as run, after ``--rate-rps`` / ``--adapters``)
- ``wall_s``, ``speedup`` (simulated seconds per wall second)

Records (``records.csv`` has a header row, empty cells for null/NaN; ``records.jsonl`` one JSON
object per line, null for NaN), one per request, in :data:`loragate.simulate.records.COLUMNS`
order: ``request_id``, ``adapter`` (empty/null: the base model), ``rank``, ``replica``
(empty/null: routing found none), ``arrival_s``, ``first_token_s``, ``finish_s`` (simulated
seconds from the start; empty/null unless ``ok``), ``prompt_tokens``, ``max_tokens``,
``output_tokens``, ``deferred_s`` (time waiting for a LoRA slot), ``preemptions``, ``status``
(``ok``, ``rejected``, ``unfinished``), ``ttft_s``, ``itl_s`` (mean; empty/null for one-token
outputs), ``e2e_s``, ``reason`` (rejected requests: ``context_length``, ``invalid_request``,
``no_replica``). Rows are written in finishing order, not arrival order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loragate.core.errors import ConfigError

SUMMARY_NAME = "summary.json"
OUTPUT_NAMES = (SUMMARY_NAME, "records.csv", "records.jsonl")


def earlier_outputs(out: Path) -> list[Path]:
    """The files of :data:`OUTPUT_NAMES` that exist in ``out``."""
    return [out / name for name in OUTPUT_NAMES if (out / name).is_file()]


def claim(out: Path, *, overwrite: bool) -> None:
    """Make ``out`` ready for a new run's outputs: create it, and remove an earlier run's
    outputs if ``overwrite`` (else refuse with a :class:`ConfigError` naming them).

    Raises ``OSError`` when the directory cannot be made or a file removed."""
    found = earlier_outputs(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found)
        raise ConfigError(
            f"{out} holds an earlier run's outputs ({names}): pass --overwrite to replace "
            "them, or choose another directory",
            key="--out",
        )
    out.mkdir(parents=True, exist_ok=True)
    for path in found:
        path.unlink()


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary.json`` whole or not at all (a temporary file renamed over it)."""
    path = out / SUMMARY_NAME
    tmp = out / f".{SUMMARY_NAME}.tmp"
    try:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
