"""``POST /admin/adapters`` loads the adapter on the first healthy replica that takes it: a path
no replica can load is a 400 with vLLM's reasons (the registration taken back), not a 201
followed by a 502 for every request. A replica that cannot be reached (nothing listening, or no
answer within ``limits.admin_timeout_s``) is passed over for the next one. The 201 says where
it was loaded (``loaded_on``), or that it was not (``untried``), and why not elsewhere
(``refused_by``, ``not_tried``). Scripted replicas on
loopback answer as vLLM does."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import openai
import pytest
from gateway_harness import PickyReplica, gateway_config, openai_client, picky_replicas

from loragate.gateway import running_gateway

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url + path, headers=AUTH, json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def _cfg(replicas: list[PickyReplica]) -> Any:
    return gateway_config([r.url for r in replicas], admin={"token": TOKEN})


async def test_a_path_no_replica_can_load_is_a_400_and_not_registered() -> None:
    async with picky_replicas() as replicas, running_gateway(_cfg(replicas), port=0) as gw:
        bad = {"name": "typo", "path": "/models/loras/typo"}  # the stubs read /loras/ only
        status, body = await _admin(gw.url, "POST", "/admin/adapters", bad)
        assert status == 400, body
        error = body["error"]
        assert error["param"] == "path" and error["type"] == "invalid_request_error"
        assert "no replica could load adapter 'typo' from '/models/loras/typo'" in error["message"]
        assert "replica r0: " in error["message"] and "replica r1: " in error["message"]
        assert "No adapter found" in error["message"]  # vLLM's reason
        _, listed = await _admin(gw.url, "GET", "/admin/adapters")
        assert "typo" not in {a["name"] for a in listed["adapters"]}
        _, reps = await _admin(gw.url, "GET", "/admin/replicas")
        assert all(r["refused_adapters"] == {} for r in reps["replicas"])
        async with openai_client(gw.url) as client:
            try:
                await client.completions.create(model="typo", prompt="x", max_tokens=2)
                raise AssertionError("a request for the rejected adapter was served")
            except openai.NotFoundError:
                pass
        # The corrected path registers (the rejected attempt leaves nothing in the way).
        good = {"name": "typo", "path": "/loras/typo"}
        status, body = await _admin(gw.url, "POST", "/admin/adapters", good)
        assert status == 201, body
        assert any("typo" in r.adapters for r in replicas)


async def test_the_refusals_of_a_rejected_registration_say_it_is_taken_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every replica refuses: the log lines say what happens (taken back, a 404 for its
    requests), not what a refusal of a served adapter means (a 502 naming the refusals)."""
    async with picky_replicas() as replicas, running_gateway(_cfg(replicas), port=0) as gw:
        bad = {"name": "ghost", "path": "/models/loras/ghost"}  # the stubs read /loras/ only
        with caplog.at_level(logging.WARNING):
            status, body = await _admin(gw.url, "POST", "/admin/adapters", bad)
        assert status == 400, body
        async with openai_client(gw.url) as client:
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="ghost", prompt="x", max_tokens=2)
    refusals = [
        r.getMessage() for r in caplog.records if "failed to load on replica" in r.getMessage()
    ]
    assert len(refusals) == 2, refusals
    assert not any("get a 502" in m for m in refusals), refusals
    first, last = refusals
    assert "(tried next on replica " in first
    assert "the registration is taken back" in last
    assert "requests for ghost get a 404: the model does not exist" in last
    taken_back = [r for r in caplog.records if "not registered (taken back" in r.getMessage()]
    assert len(taken_back) == 1 and taken_back[0].levelno == logging.WARNING


async def test_a_replica_that_refuses_while_another_loads_it_keeps_its_refusal() -> None:
    async with picky_replicas() as replicas, running_gateway(_cfg(replicas), port=0) as gw:
        r0, r1 = replicas
        r0.refuse = {"extra"}
        spec = {"name": "extra", "path": "/loras/extra"}
        status, body = await _admin(gw.url, "POST", "/admin/adapters", spec)
        assert status == 201, body
        assert r0.refused == 1 and r1.adapters.get("extra") == "/loras/extra"
        # The body says where it was loaded and who refused (before: the same 201 either way).
        assert (body["loaded_on"], body["untried"], body["not_tried"]) == (["r1"], False, {})
        assert list(body["refused_by"]) == ["r0"]
        assert "greater than max_lora_rank" in body["refused_by"]["r0"]  # vLLM's reason
        _, reps = await _admin(gw.url, "GET", "/admin/replicas")
        refused = {r["id"]: set(r["refused_adapters"]) for r in reps["replicas"]}
        assert refused == {"r0": {"extra"}, "r1": set()}


async def test_an_unreachable_replica_is_passed_over_for_one_that_loads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with picky_replicas(2) as reps:
        r0, r1 = reps
        async with running_gateway(_cfg([r0, r1]), port=0) as gw:
            await r0.runner.cleanup()  # polled healthy at start, nothing listening now
            spec = {"name": "extra", "path": "/loras/extra"}
            with caplog.at_level(logging.INFO, logger="loragate.gateway.admin"):
                status, body = await _admin(gw.url, "POST", "/admin/adapters", spec)
            assert status == 201, body
            assert r1.adapters.get("extra") == "/loras/extra"  # tried after r0, and loaded
            assert (body["loaded_on"], body["untried"]) == (["r1"], False)
            assert (body["refused_by"], body["not_tried"]) == ({}, {"r0": "unreachable"})
            assert "adapter extra not tried on replica r0" in caplog.text
            _, listed = await _admin(gw.url, "GET", "/admin/adapters")
            extra = next(a for a in listed["adapters"] if a["name"] == "extra")
            assert extra["registered_on"] == ["r1"]
            async with openai_client(gw.url) as client:
                done = await client.completions.create(model="extra", prompt="x", max_tokens=2)
            assert done.choices[0].text == "hi from r1"


async def test_a_path_the_reachable_replicas_refuse_is_a_400_naming_the_unreachable_ones() -> None:
    async with picky_replicas(3) as reps:
        r0, r1, r2 = reps
        r0.load_delay_s = 3600.0  # takes the load and never answers: past admin_timeout_s
        r2.refuse = {"big"}
        cfg = gateway_config(
            [r.url for r in (r0, r1, r2)], admin={"token": TOKEN}, limits={"admin_timeout_s": 0.5}
        )
        async with running_gateway(cfg, port=0) as gw:
            await r1.runner.cleanup()  # polled healthy at start, nothing listening now
            spec = {"name": "big", "path": "/loras/big"}
            status, body = await _admin(gw.url, "POST", "/admin/adapters", spec)
            assert status == 400, body
            error = body["error"]
            assert error["param"] == "path"
            message = error["message"]
            assert message.startswith("no replica could load adapter 'big' from '/loras/big': ")
            assert "replica r2: " in message and "greater than max_lora_rank" in message
            assert "not tried: " in message
            assert "replica r0 (no answer within limits.admin_timeout_s)" in message
            assert "replica r1 (unreachable)" in message
            assert r0.url not in message and r1.url not in message  # ids, never URLs
            assert r2.refused == 1
            _, listed = await _admin(gw.url, "GET", "/admin/adapters")
            assert "big" not in {a["name"] for a in listed["adapters"]}  # taken back


async def test_a_registration_no_replica_could_be_asked_about_stays(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        picky_replicas(2) as reps,
        running_gateway(_cfg(reps), port=0) as gw,
    ):
        for rep in reps:
            await rep.runner.cleanup()
        spec = {"name": "later", "path": "/loras/later"}
        with caplog.at_level(logging.WARNING, logger="loragate.gateway.admin"):
            status, body = await _admin(gw.url, "POST", "/admin/adapters", spec)
        assert status == 201, body
        # Automation can tell it apart from a load (before, only the log said so).
        assert (body["loaded_on"], body["untried"], body["refused_by"]) == ([], True, {})
        assert body["not_tried"] == {"r0": "unreachable", "r1": "unreachable"}
        assert "adapter later registered untried: no healthy replica could be asked" in (
            caplog.text
        )
        _, listed = await _admin(gw.url, "GET", "/admin/adapters")
        assert "later" in {a["name"] for a in listed["adapters"]}
