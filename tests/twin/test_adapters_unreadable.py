"""An ``adapter_config.json`` that ``json`` cannot read is an unreadable adapter folder with
the reason (``AdapterFolderError``), whatever ``json`` raises: JSON nested deeper than its
parser recurses (``RecursionError``) and an integer of more than 4,300 digits (``ValueError``,
Python's limit on int conversion) escaped ``read_adapter_folder``, which caught only
``JSONDecodeError``: the simulated replica answered its load with a 500, and the gateway's
rank check (``load_config``, ``POST /admin/adapters``) raised."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loragate.twin.adapters import ADAPTER_CONFIG, AdapterFolderError, read_adapter_folder
from loragate.twin.server import RunningReplica

StartReplica = Callable[..., AbstractAsyncContextManager[RunningReplica]]

DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = '{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}"

UNREADABLE = [
    (DEEP, "cannot read adapter_config.json: nested too deep for a JSON parser"),
    (DIGITS, "cannot read adapter_config.json: Exceeds the limit (4300 digits) for integer "
     "string conversion: value has 5001 digits"),
    ("{", "cannot read adapter_config.json: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),  # as before
    (b"\xff{}", "cannot read adapter_config.json: 'utf-8' codec can't decode byte 0xff in "
     "position 0: invalid start byte"),  # as before
]  # fmt: skip


def _folder(root: Path, text: str | bytes) -> str:
    root.mkdir()
    config = root / ADAPTER_CONFIG
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text, encoding="utf-8")
    return str(root)


@pytest.mark.parametrize(("text", "reason"), UNREADABLE, ids=["deep", "digits", "json", "utf8"])
def test_an_unreadable_config_is_an_adapter_folder_error_saying_why(
    tmp_path: Path, text: str | bytes, reason: str
) -> None:
    with pytest.raises(AdapterFolderError) as exc:
        read_adapter_folder(_folder(tmp_path / "lora", text))
    assert str(exc.value) == reason


async def test_the_simulated_replica_refuses_to_load_it_saying_why(
    start_replica: StartReplica, tmp_path: Path
) -> None:
    deep = _folder(tmp_path / "deep", DEEP)
    digits = _folder(tmp_path / "digits", DIGITS)
    async with start_replica() as r, aiohttp.ClientSession() as http:
        for name, path, reason in (  # Python's own words, as vLLM's worker reads it
            ("deep", deep, "maximum recursion depth exceeded"),
            ("big", digits, "Exceeds the limit (4300 digits) for integer string conversion"),
        ):
            body = {"lora_name": name, "lora_path": path}
            async with http.post(r.url + "/v1/load_lora_adapter", json=body) as resp:
                assert resp.status == 500, await resp.text()  # vLLM's add_lora failure
                error: dict[str, Any] = (await resp.json())["error"]
            assert error["message"].startswith(
                f"Call to add_lora method failed: Worker failed with error '{reason}"
            )
        async with http.get(r.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-llama"]


def test_json_still_reads_what_it_can(tmp_path: Path) -> None:
    path = _folder(tmp_path / "lora", json.dumps({"peft_type": "LORA", "r": 16}))
    folder = read_adapter_folder(path)
    assert folder is not None and folder.rank == 16
