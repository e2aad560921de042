"""What an operator of several gateway instances reads in ``/metrics``, scraped over loopback:
adapter loads as a counter, retries by the replica that failed and why, config reloads and the
policy each instance runs, the process collectors, and the shared in-flight view next to the
instance's own."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    picky_replicas,
    serving,
)

import loragate
from loragate.gateway import load_config, running_gateway
from redis_fixture import RedisServer

TOKEN = "metrics-token"
EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "policies" / "loragate.yaml"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)", line)
        if m is not None and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out.append((labels, float(m.group(3))))
    return out


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of ``name{labels}`` (exactly those labels), None if there is no such sample."""
    for got, value in _samples(text, name):
        if got == labels:
            return value
    return None


# -- 1. adapter loads ----------------------------------------------------------------------


async def test_adapter_loads_are_a_counter_with_total_suffix(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        for model in ("lora-0", "lora-1", "lora-0"):
            await client.completions.create(model=model, prompt="p", max_tokens=1)
        text = await _scrape(gw.url)
    assert "# TYPE loragate_adapter_loads_total counter" in text
    assert _sample(text, "loragate_adapter_loads_total", replica="r0") == 2
    assert _sample(text, "loragate_adapter_loads", replica="r0") is None  # no gauge left


# -- 2. retries ----------------------------------------------------------------------------


async def _serve_two(replicas: list[Any], model: str, fault: str) -> str:
    """Two requests for ``model``, round robin over r0 (failing as ``fault`` says) and r1;
    returns the gateway's /metrics after them."""
    cfg = gateway_config([r.url for r in replicas], routing="round_robin")
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        if fault == "connect":
            await replicas[0].runner.cleanup()  # polled healthy at start, gone now
        for _ in range(2):
            done = await client.completions.create(model=model, prompt="p", max_tokens=1)
            assert done.choices[0].text == "hi from r1"
        return await _scrape(gw.url)


@pytest.mark.parametrize("fault", ["dropped", "connect", "bad_response"])
async def test_a_retry_is_counted_under_the_replica_that_failed_and_why(
    replicas: list[ScriptedReplica], fault: str
) -> None:
    if fault == "dropped":
        replicas[0].mode = "drop"
    elif fault == "bad_response":
        replicas[0].raw_answer = b"NOT HTTP AT ALL\r\n\r\n"
    text = await _serve_two(replicas, BASE, fault)
    assert _samples(text, "loragate_upstream_retries_total") == [
        ({"replica": "r0", "reason": fault}, 1.0)
    ]
    # The request itself counts once, with the replica that answered it.
    assert _sample(text, "loragate_requests_total", adapter="", replica="r1", status="200") == 2
    assert "# TYPE loragate_upstream_retries_total counter" in text


async def test_a_refused_adapter_load_is_counted_as_a_retry() -> None:
    async with picky_replicas() as picky:
        picky[0].refuse = {"lora-0"}
        text = await _serve_two(picky, "lora-0", "refused_load")
    assert _samples(text, "loragate_upstream_retries_total") == [
        ({"replica": "r0", "reason": "refused_load"}, 1.0)
    ]


class _DroppingLoads(ScriptedReplica):
    """Closes the connection on every adapter load (it dies while loading)."""

    async def _load(self, request: web.Request) -> web.Response:
        self.load_calls += 1
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_an_adapter_load_that_does_not_get_through_counts_a_retry() -> None:
    async with contextlib.AsyncExitStack() as stack:
        pair = []
        for rep in (_DroppingLoads("r0"), ScriptedReplica("r1")):
            rep.url, rep.runner = await stack.enter_async_context(serving(rep.app))
            pair.append(rep)
        text = await _serve_two(pair, "lora-0", "load_failed")
        assert pair[0].load_calls == 1
    assert _samples(text, "loragate_upstream_retries_total") == [
        ({"replica": "r0", "reason": "load_failed"}, 1.0)
    ]


async def test_a_replica_that_forgot_its_adapter_counts_a_retry(
    replicas: list[ScriptedReplica],
) -> None:
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        del replicas[0].adapters["lora-0"]  # restarted, or unloaded by hand
        done = await client.completions.create(model="lora-0", prompt="p", max_tokens=1)
        assert done.choices[0].text == "hi from r0"
        text = await _scrape(gw.url)
    assert _samples(text, "loragate_upstream_retries_total") == [
        ({"replica": "r0", "reason": "adapter_missing"}, 1.0)
    ]
    assert _sample(text, "loragate_adapter_loads_total", replica="r0") == 2


# -- 3. config reloads and the policy in force ---------------------------------------------


def _write(path: Path, replicas: list[ScriptedReplica], routing: Any, **sections: Any) -> Path:
    doc: dict[str, Any] = {
        "base_model": BASE,
        "replicas": [{"id": r.name, "url": r.url} for r in replicas],
        "adapters": [{"name": "lora-0", "path": "/loras/lora-0"}],
        "routing": routing,
        "poller": {"interval_s": 3600},
        "admin": {"token": TOKEN},
    }
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def _config_info(text: str) -> list[dict[str, str]]:
    found = _samples(text, "loragate_config_info")
    assert all(value == 1 for _, value in found), found
    return [labels for labels, _ in found]


async def test_reloads_and_the_policy_in_force_are_in_metrics(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    hashing = {"policy": "consistent_hash", "load_factor": 1.5}
    path = _write(tmp_path / "gw.yaml", replicas, "round_robin")
    async with (
        running_gateway(load_config(path), port=0, config_path=path) as gw,
        aiohttp.ClientSession() as http,
    ):
        before = await _scrape(gw.url)
        assert _sample(before, "loragate_config_reloads_total", result="ok") == 0
        assert _sample(before, "loragate_config_reloads_total", result="rejected") == 0
        [first] = _config_info(before)
        assert first["policy"] == "round_robin" and re.fullmatch(r"[0-9a-f]{64}", first["sha256"])

        _write(path, replicas, {"policy": "no_such_policy"})
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 400
        rejected = await _scrape(gw.url)
        assert _sample(rejected, "loragate_config_reloads_total", result="rejected") == 1
        assert _sample(rejected, "loragate_config_reloads_total", result="ok") == 0
        assert _config_info(rejected) == [first]  # the old config stays in force

        _write(path, replicas, hashing)
        async with http.post(gw.url + "/admin/reload", headers=AUTH) as resp:
            assert resp.status == 200
        after = await _scrape(gw.url)
        assert _sample(after, "loragate_config_reloads_total", result="ok") == 1
        assert _sample(after, "loragate_config_reloads_total", result="rejected") == 1
        [second] = _config_info(after)  # one series: the old one is gone
        assert second["policy"] == "consistent_hash"
        assert second["sha256"] != first["sha256"]

    # Instances whose routing sections agree show the same sha256, however the rest of their
    # files differ; another load factor is another sha256.
    same = _write(tmp_path / "same.yaml", replicas[:1], dict(reversed(hashing.items())),
                  poller={"interval_s": 1800})  # fmt: skip
    other = _write(tmp_path / "other.yaml", replicas, {**hashing, "load_factor": 1.25})
    seen = []
    for file in (same, other):
        async with running_gateway(load_config(file), port=0) as gw:
            seen += _config_info(await _scrape(gw.url))
    assert seen[0] == second
    assert seen[1]["policy"] == "consistent_hash" and seen[1]["sha256"] != second["sha256"]


async def test_equivalent_routing_sections_show_one_sha256(
    replicas: list[ScriptedReplica], tmp_path: Path
) -> None:
    """A policy's name, the same as a mapping, the example file with every parameter at its
    default, and a file that gives one default as an integer are one routing section: one
    sha256 in loragate_config_info. Another value of one parameter, another seed, another
    policy: another sha256. (Before, the first four showed four digests.)"""
    written_out = yaml.safe_load(EXAMPLE_POLICY.read_text(encoding="utf-8"))["routing"]
    sections: list[Any] = [
        "loragate",
        {"policy": "loragate"},
        written_out,
        {"policy": "loragate", "params": {"hold_factor": 1, "new_slot_weight": None}},
        {"policy": "loragate", "hold_factor": 2},
        {"policy": "loragate", "seed": 7},
        "least_loaded",
    ]
    seen = []
    for i, routing in enumerate(sections):
        path = _write(tmp_path / f"gw{i}.yaml", replicas, routing)
        async with running_gateway(load_config(path), port=0) as gw:
            [info] = _config_info(await _scrape(gw.url))
        seen.append(info)
    by_name, as_mapping, example_file, int_and_null, other_value, seeded, other = seen
    assert by_name["policy"] == "loragate" and re.fullmatch(r"[0-9a-f]{64}", by_name["sha256"])
    assert as_mapping == by_name
    assert example_file == by_name
    assert int_and_null == by_name
    assert other_value["policy"] == "loragate" and other_value["sha256"] != by_name["sha256"]
    assert seeded["sha256"] not in {by_name["sha256"], other_value["sha256"]}
    assert other["sha256"] not in {by_name["sha256"], other_value["sha256"], seeded["sha256"]}


# -- 4. process collectors -----------------------------------------------------------------


async def test_process_metrics_are_exported(replicas: list[ScriptedReplica]) -> None:
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw:
        text = await _scrape(gw.url)
    started = _sample(text, "process_start_time_seconds")
    assert started is not None and 0 < started <= time.time()
    rss = _sample(text, "process_resident_memory_bytes")
    assert rss is not None and rss > 0
    assert _samples(text, "python_info")


async def test_build_info_names_the_version_and_python(replicas: list[ScriptedReplica]) -> None:
    """loragate_build_info{version,python} 1: which release each instance of a fleet runs."""
    cfg = gateway_config([replicas[0].url])
    async with running_gateway(cfg, port=0) as gw:
        text = await _scrape(gw.url)
    assert "# TYPE loragate_build_info gauge" in text
    assert _samples(text, "loragate_build_info") == [
        ({"version": loragate.__version__, "python": platform.python_version()}, 1.0)
    ]


# -- 5. the shared in-flight view ----------------------------------------------------------


async def _until(url: str, name: str, value: float, **labels: str) -> str:
    """Scrape ``url`` until ``name{labels}`` is ``value`` (a hang guard, not a timing check);
    returns the last scrape."""
    for _ in range(200):
        text = await _scrape(url)
        if _sample(text, name, **labels) == value:
            return text
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never became {value}:\n{text}")


async def test_shared_in_flight_shows_every_instances_requests(
    replicas: list[ScriptedReplica], redis_server: RedisServer
) -> None:
    gate = asyncio.Event()
    replicas[0].stream_gate = gate  # r0 holds its streams after the first event
    state = {
        "backend": "redis",
        "redis_url": redis_server.url,
        "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
        "refresh_s": 0.05,
        "op_timeout_s": 0.5,
        "maintenance_interval_s": 0.02,
    }
    cfg = gateway_config([replicas[0].url], state=state)
    async with (
        running_gateway(cfg, port=0) as a,
        running_gateway(cfg, port=0) as b,
        openai_client(a.url) as client,
    ):
        stream = await client.completions.create(model=BASE, prompt="hold", stream=True)
        it = stream.__aiter__()
        assert (await asyncio.wait_for(it.__anext__(), timeout=10)).choices[0].text == " one"
        seen_b = await _until(b.url, "loragate_shared_in_flight_requests", 1, replica="r0")
        assert _sample(seen_b, "loragate_in_flight_requests", replica="r0") == 0
        seen_a = await _scrape(a.url)
        assert _sample(seen_a, "loragate_in_flight_requests", replica="r0") == 1
        assert _sample(seen_a, "loragate_shared_in_flight_requests", replica="r0") == 1
        gate.set()
        async for _ in it:
            pass
        await _until(b.url, "loragate_shared_in_flight_requests", 0, replica="r0")
