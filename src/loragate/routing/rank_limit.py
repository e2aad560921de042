"""The rank check every routing profile applies: a replica whose ``--max-lora-rank`` is known
(``ReplicaSettings.max_lora_rank_known``: said in its config) refuses to load an adapter of a
higher rank (vLLM's 400 "LoRA rank R is greater than max_lora_rank M"), so it is no candidate
for one. A replica whose ``max_lora_rank`` is only assumed (vLLM's default; vLLM does not
report the flag) takes every rank: routing cannot tell, and the replica's own refusal is
handled as any refused load is."""

from __future__ import annotations

from collections.abc import Sequence

from loragate.core.types import ReplicaSettings, ReplicaSnapshot


def within_rank_limit(settings: ReplicaSettings, rank: int) -> bool:
    """Whether a replica with ``settings`` may be sent an adapter of ``rank``."""
    return rank <= settings.max_lora_rank or not settings.max_lora_rank_known


def above_rank_limit(
    adapter: str, rank: int, replicas: Sequence[ReplicaSnapshot], policy: str
) -> str:
    """Why no candidate of ``replicas`` can take ``adapter`` when each healthy one was left
    out for its rank: their max_lora_rank, and the unhealthy ones that could take it."""
    limited = [r for r in replicas if r.healthy]
    could = [
        r.replica_id for r in replicas if not r.healthy and within_rank_limit(r.settings, rank)
    ]
    limits = ", ".join(f"{r.replica_id} ({r.settings.max_lora_rank})" for r in limited)
    tail = ""
    if could:
        tail = f"; {', '.join(could)}, which could, {'is' if len(could) == 1 else 'are'} unhealthy"
    return (
        f"no candidate replica can take model {adapter!r}: its LoRA rank {rank} is above the "
        f"max_lora_rank of {limits}{tail} (policy {policy!r})"
    )
