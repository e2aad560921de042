"""A replica that could take an adapter's
rank refuses it (its path), and the only other one is below the rank (said in its config): the
client gets the refusal's 502 naming both reasons, not routing's 503 about ranks alone. Over
loopback with simulated vLLM 0.32 replicas and the openai SDK."""

from __future__ import annotations

import contextlib
from pathlib import Path

import openai
from gateway_harness import openai_client

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica


async def test_a_refusal_where_the_rank_fits_is_what_the_client_learns(tmp_path: Path) -> None:
    write_adapter_folder(str(tmp_path / "big"), rank=16)
    async with contextlib.AsyncExitStack() as stack:
        urls = []
        for rank in (8, 16):
            cfg = ReplicaConfig(
                served_model_name="m", enable_lora=True, max_loras=2, max_lora_rank=rank,
                time_scale=50.0,
            )  # fmt: skip
            urls.append((await stack.enter_async_context(run_replica(cfg, port=0))).url)
        gw_cfg = config_from_mapping(
            {
                "base_model": "m",
                "replicas": [
                    {"id": "r0", "url": urls[0], "settings": {"max_lora_rank": 8}},
                    {"id": "r1", "url": urls[1]},
                ],
                "adapters": [{"name": "big", "path": str(tmp_path / "nowhere"), "rank": 16}],
                "routing": "round_robin",
                "poller": {"interval_s": 3600},
            }
        )
        gw = await stack.enter_async_context(running_gateway(gw_cfg, port=0))
        client = await stack.enter_async_context(openai_client(gw.url))
        messages = []
        for _ in range(3):
            try:
                await client.completions.create(model="big", prompt="p", max_tokens=1)
            except openai.APIStatusError as exc:
                assert exc.status_code == 502  # before the hook: 503 about r0's rank alone
                assert isinstance(exc.body, dict)
                messages.append(exc.body["message"])
        assert len(messages) == 3
        assert "replica r1: " in messages[0] and "No adapter found" in messages[0]
        for later in messages[1:]:
            assert "No adapter found" in later
            assert "or cannot take its rank" in later
            assert "replica r0: its max_lora_rank 8 is below the adapter's rank 16" in later
        assert gw.gateway.pool.refusals.counts == {("big", "r1"): 1}
