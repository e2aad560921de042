"""The twin's performance profile seen through routing's ``StepTimeModel`` protocol."""

from __future__ import annotations

from loragate.twin.profile import PerformanceProfile


class ProfileStepTime:
    """Lets cost-aware policies (``loragate``) estimate with the same profile the engines run.

    A decode-only step of ``batch_size`` sequences over ``distinct_adapters`` adapters, at the
    deployment's ``max_lora_rank`` (the profile's rank term, if any, uses the batch's largest
    rank; the maximum is a safe upper bound for routing estimates).
    """

    __slots__ = ("_profile", "_rank")

    def __init__(self, profile: PerformanceProfile, *, max_lora_rank: int) -> None:
        self._profile = profile
        self._rank = max_lora_rank

    def step_time_s(self, batch_size: int, distinct_adapters: int) -> float:
        return self._profile.step_time_s(
            batch_size=max(1, batch_size),
            distinct_adapters=distinct_adapters,
            prefill_tokens=0,
            decode_tokens=max(1, batch_size),
            max_rank_in_batch=self._rank if distinct_adapters else 0,
            num_waiting=0,
            lora_enabled=True,
        )

    def prefill_token_s(self) -> float:
        """Marginal seconds per prompt token in a step (one full chunk of 2048 tokens, minus the
        same step without it, per token)."""
        tokens = 2048

        def step(prefill: int) -> float:
            return self._profile.step_time_s(
                batch_size=2 if prefill else 1,
                distinct_adapters=1,
                prefill_tokens=prefill,
                decode_tokens=1,
                max_rank_in_batch=self._rank,
                num_waiting=0,
                lora_enabled=True,
            )

        return max(0.0, (step(tokens) - step(0)) / tokens)

    def load_s(self, rank: int, from_disk: bool) -> float:
        t = self._profile.cpu_to_gpu_load_s(rank)
        if from_disk:
            t += self._profile.disk_to_cpu_load_s(rank)
        return t
