"""``POST /admin/adapters`` refuses an adapter path with a control character or a lone surrogate
as a config file's ``adapters[i].path`` is refused: a 400 in the OpenAI error shape, param
``path``, nothing registered and no replica asked. Before, ``~`` and a user name with a NUL
made the rank check (``os.path.expanduser``) raise ``ValueError``: a 500; other such paths were
registered and sent to the replicas."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, headers=AUTH, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("~\0nobody/lora-0", "character '\\x00' at position 1"),  # was a 500
        ("/a\0b", "character '\\x00' at position 2"),
        ("/loras/x\r\nWARNING forged", "character '\\r' at position 8"),
        ("/loras/\x9b", "character '\\x9b' at position 7"),
        ("~\udc80/lora", "character '\\udc80' at position 1"),  # JSON can carry one
    ],
)
async def test_a_path_with_a_control_character_is_a_400_naming_path(
    replicas: list[ScriptedReplica], path: str, says: str
) -> None:
    cfg = gateway_config([r.url for r in replicas], admin={"token": TOKEN})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        adapters = gw.url + "/admin/adapters"
        status, body = await _call(http, "POST", adapters, {"name": "new", "path": path})
        assert status == 400, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"]) == ("invalid_request_error", "path")
        assert error["message"].startswith(f"{says} is not allowed in an adapter path")
        status, body = await _call(http, "GET", adapters)
        assert "new" not in {a["name"] for a in body["adapters"]}
        # The gateway serves on, and a good path registers.
        status, body = await _call(http, "POST", adapters, {"name": "new", "path": "/loras/é"})
        assert status == 201, body
    assert [r.load_calls for r in replicas].count(1) == 1  # only the good one was loaded
