"""Without an admin token every path under /admin answers one and the same 404, which says the
admin API is disabled and how to enable it; with a token, unknown admin paths and methods are
answered like any other unknown path (404 ``no such endpoint``, 405 with ``Allow``)."""

from __future__ import annotations

import aiohttp
import pytest
from gateway_harness import ScriptedReplica, gateway_config

from loragate.gateway import running_gateway

AUTH = {"Authorization": "Bearer some-token"}
ADMIN_CALLS = [
    ("GET", "/admin/replicas"),
    ("GET", "/admin/adapters"),
    ("POST", "/admin/adapters"),
    ("DELETE", "/admin/adapters/lora-0"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/reload"),  # a method the route does not take
    ("GET", "/admin/no-such-thing"),
    ("GET", "/admin"),
    ("PUT", "/admin/"),
]


async def _call(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, bytes]:
    async with http.request(method, url, headers=AUTH) as resp:
        return resp.status, await resp.read()


async def test_every_admin_path_says_the_admin_api_is_disabled_without_a_token(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    cfg = gateway_config([r.url for r in replicas])
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        answers = {await _call(http, method, gw.url + path) for method, path in ADMIN_CALLS}
        async with http.get(gw.url + "/admin/replicas") as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
    assert len(answers) == 1  # one and the same answer for all of them
    ((status, _),) = answers
    assert status == 404
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error",
                                                             "not_found", None)  # fmt: skip
    message = error["message"]
    assert message.startswith("the admin API is disabled: no admin token is set")
    assert "admin.token" in message and "LORAGATE_ADMIN_TOKEN" in message


async def test_with_a_token_unknown_admin_paths_are_answered_like_other_unknown_paths(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    cfg = gateway_config([r.url for r in replicas], admin={"token": "some-token"})
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/admin/no-such-thing", headers=AUTH) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
            assert error["code"] == "not_found"
            assert error["message"] == "no such endpoint: GET /admin/no-such-thing"
        async with http.get(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 405 and resp.headers["Allow"] == "POST"
        async with http.get(gw.url + "/admin/replicas", headers=AUTH) as resp:
            assert resp.status == 200


async def test_get_on_a_drain_path_is_a_405_naming_post_and_delete(
    replicas: list[ScriptedReplica], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ``GET /admin/replicas/r0/drain`` was read as ``GET /admin/replicas/R`` for a
    replica ``r0/drain`` (ids may hold '/') and answered 404 "replica 'r0/drain' does not
    exist"."""
    monkeypatch.delenv("LORAGATE_ADMIN_TOKEN", raising=False)
    cfg = gateway_config(
        [r.url for r in replicas],
        admin={"token": "some-token"},
        replicas=[{"id": "r0", "url": replicas[0].url}, {"id": "x/drain", "url": replicas[1].url}],
    )
    async with running_gateway(cfg, port=0) as gw, aiohttp.ClientSession() as http:
        for rid in ("r0", "no-such-replica"):
            async with http.get(f"{gw.url}/admin/replicas/{rid}/drain", headers=AUTH) as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "DELETE,POST"
                error = (await resp.json())["error"]
            assert error["code"] == "method_not_allowed"
            assert error["message"] == (
                f"method not allowed: GET /admin/replicas/{rid}/drain (allowed: DELETE, POST)"
            )
        # A replica whose id ends so is still answered.
        async with http.get(gw.url + "/admin/replicas/x/drain", headers=AUTH) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == "x/drain"
        async with http.get(gw.url + "/admin/replicas/r0/drain") as resp:
            assert resp.status == 401  # the token first, as on every admin path
