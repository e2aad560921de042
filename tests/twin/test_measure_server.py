"""What ``loragate twin measure`` reads from a vLLM server's start-up log: the KV capacity (GPU
and CPU builds word it alike, GPU with thousands separators), the engine init time and the
chunked-prefill token budget."""

# ruff: noqa: E501  (vLLM log lines, verbatim)
from __future__ import annotations

from loragate.twin.measure_server import StartupFacts, parse_log

GPU_LOG = """\
(EngineCore_DP0 pid=311) INFO 11-28 10:00:01 [gpu_model_runner.py:2602] Loading weights took 4.21 seconds
(EngineCore_DP0 pid=311) INFO 11-28 10:00:09 [kv_cache_utils.py:2327] GPU KV cache size: 421,520 tokens, Maximum concurrency for 131,072 tokens per request: 3.22x
(EngineCore_DP0 pid=311) INFO 11-28 10:00:20 [core.py:210] init engine (profile, create kv cache, warmup model) took 18.52 s
(APIServer pid=300) INFO 11-28 10:00:00 [scheduler.py:308] Chunked prefill is enabled with max_num_batched_tokens=8192.
"""
CPU_LOG = """\
(EngineCore pid=29984) INFO 11-28 21:32:50 [kv_cache_utils.py:1313] CPU KV cache size: 32,768 tokens, Maximum concurrency for 512 tokens per request: 64.00x
(APIServer pid=28983) INFO 11-28 21:31:30 [api_utils.py:286] non-default args: {'port': 40463, 'max_num_batched_tokens': 2048, 'max_num_seqs': 32}
"""


def test_a_gpu_log_gives_kv_init_time_and_token_budget() -> None:
    facts = parse_log(GPU_LOG)
    assert facts.weights_load_s == 4.21 and facts.engine_init_s == 18.52
    assert facts.max_num_batched_tokens == 8192
    # vLLM 0.32's v1/core/kv_cache_utils.py update_kv_cache_capacity: "{GPU|CPU} KV cache
    # size: {tokens:,} tokens, Maximum concurrency for {max_model_len:,} tokens per request"
    assert (facts.kv_tokens, facts.max_model_len_logged) == (421520, 131072)
    assert facts.max_concurrency_x == 3.22


def test_a_cpu_log_gives_kv_tokens_and_the_budget_from_the_args() -> None:
    facts = parse_log(CPU_LOG)
    assert facts == StartupFacts(
        kv_tokens=32768,
        max_model_len_logged=512,
        max_concurrency_x=64.0,
        max_num_batched_tokens=2048,
    )
