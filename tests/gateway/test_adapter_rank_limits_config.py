"""A config file whose adapter's rank is above the ``max_lora_rank`` of every replica (each
said in ``settings.max_lora_rank``) is refused at load, and at a reload, naming the file, the
line and the adapter's key: no replica could load that adapter (vLLM refuses a rank above its
``--max-lora-rank``). One replica whose max_lora_rank is not said may take any rank: loaded."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest
from gateway_harness import openai_client

from loragate.core.errors import ConfigError
from loragate.gateway import load_config, running_gateway
from loragate.gateway.config_file import parse_config_text
from loragate.twin.adapters import write_adapter_folder
from loragate.twin.replica_config import ReplicaConfig
from loragate.twin.server import run_replica

BASE = "tiny-llama"
TOKEN = "reload-rank"


def _text(r1_settings: str, adapters: str, url0: str = "http://127.0.0.1:1") -> str:
    return f"""\
base_model: {BASE}
admin: {{token: {TOKEN}}}
replicas:
  - {{id: r0, url: "{url0}", settings: {{max_lora_rank: 16}}}}
  - {{id: r1, url: "http://127.0.0.1:2"{r1_settings}}}
adapters:
{adapters}"""


def _adapters(tmp: Path, *, rank_given: bool) -> str:
    write_adapter_folder(str(tmp / "small"), rank=8)
    write_adapter_folder(str(tmp / "huge"), rank=32)
    huge = f"  - name: huge\n    path: {tmp / 'huge'}\n"
    if rank_given:
        huge += "    rank: 32\n"
    return f"  - {{name: small, path: {tmp / 'small'}, rank: 8}}\n{huge}"


def test_a_rank_given_above_every_replica_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = _text(", settings: {max_lora_rank: 8}", _adapters(tmp_path, rank_given=True))
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, source="gw.yaml")
    message = str(info.value)
    assert message.startswith("gw.yaml:10:5: adapters[1].rank: LoRA rank 32 is above"), message
    assert "max_lora_rank of every replica (r0: 16, r1: 8" in message
    assert message.endswith("no replica could load it")


def test_a_rank_read_from_the_folder_names_the_path(tmp_path: Path) -> None:
    text = _text(", settings: {max_lora_rank: 16}", _adapters(tmp_path, rank_given=False))
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, source="gw.yaml")
    message = str(info.value)
    assert message.startswith("gw.yaml:9:5: adapters[1].path: LoRA rank 32 is above"), message
    assert "(r0: 16, r1: 16" in message and "from its adapter_config.json" in message


def test_a_replica_without_a_said_max_lora_rank_may_take_it(tmp_path: Path) -> None:
    # The same file, r1's max_lora_rank not said (vLLM's default is only assumed): loaded; and
    # the first file, refused, loads once r1 says a rank that takes it.
    for r1 in ("", ", settings: {max_loras: 2}", ", settings: {max_lora_rank: 32}"):
        cfg = parse_config_text(_text(r1, _adapters(tmp_path, rank_given=True)))
        assert [a.rank for a in cfg.adapters] == [8, 32]
    with pytest.raises(ConfigError, match=r"adapters\[1\]\.rank"):
        parse_config_text(
            _text(", settings: {max_lora_rank: 16}", _adapters(tmp_path, rank_given=True))
        )


async def test_a_reload_that_adds_such_an_adapter_is_rejected(tmp_path: Path) -> None:
    cfg = ReplicaConfig(served_model_name=BASE, enable_lora=True, max_lora_rank=16)
    async with run_replica(cfg, port=0) as replica:
        path = tmp_path / "gw.yaml"
        adapters = _adapters(tmp_path, rank_given=True)
        small_only = adapters.split("  - name: huge")[0]
        path.write_text(_text(", settings: {max_lora_rank: 16}", small_only, replica.url))
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            openai_client(gw.url) as client,
            aiohttp.ClientSession() as http,
        ):
            path.write_text(_text(", settings: {max_lora_rank: 16}", adapters, replica.url))
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
                # Before: reloaded, and every request for 'huge' a refused load, a 502.
                assert resp.status == 400, await resp.text()
                error = (await resp.json())["error"]
            assert error["param"] == "adapters[1].rank"
            assert "LoRA rank 32 is above the max_lora_rank of every replica" in error["message"]
            with pytest.raises(openai.NotFoundError):  # not applied
                await client.completions.create(model="huge", prompt="p", max_tokens=1)
            done = await client.completions.create(model="small", prompt="p", max_tokens=1)
            assert done.model == "small"
