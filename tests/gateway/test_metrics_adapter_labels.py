"""The adapter and tenant labels of ``/metrics`` (``metrics.adapter_labels``,
``metrics.tenant_labels``), scraped over loopback from a gateway in front of a simulated replica
and parsed with prometheus_client's own parser: with ``first_n`` the first N names counted keep
their own series for the gateway's lifetime and every later one is ``__other__`` (the series
count is bounded, and never moves a name between series); ``none`` folds every name; ``all``
names each. The per-adapter and per-tenant TTFT (streams) and duration (answers without a
stream) histograms follow the same rule, and so does the refusals counter. A successful
stream's whole duration is in ``loragate_stream_duration_seconds``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml
from gateway_harness import (
    BASE,
    ScriptedReplica,
    gateway_config,
    openai_client,
    picky_replicas,
    serving,
)
from metric_counts import Samples, scrape

from loragate.gateway import load_config, running_gateway

OTHER = "__other__"
TENANTS = [{"name": f"t{i}", "api_keys": [f"sk-{i}"]} for i in range(3)]


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """``name``'s samples by ``label``, summed over its other labels."""
    out: dict[str, float] = {}
    for (got, pairs), value in samples.items():
        d = dict(pairs)
        if got == name and label in d:
            out[d[label]] = out.get(d[label], 0.0) + value
    return out


def _config(url: str, n: int, **metrics: Any) -> Any:
    adapters = [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(n)]
    return gateway_config([url], adapters=adapters, tenants=TENANTS, metrics=metrics)


async def _traffic(gw_url: str, calls: list[tuple[str, int, bool]]) -> None:
    """One request per (model, tenant index, stream), with that tenant's API key."""
    for model, tenant, stream in calls:
        async with openai_client(gw_url, f"sk-{tenant}") as client:
            if stream:
                events = await client.completions.create(
                    model=model, prompt="p", max_tokens=2, stream=True
                )
                assert [e async for e in events]
            else:
                done = await client.completions.create(model=model, prompt="p", max_tokens=2)
                assert done.model == model


async def test_first_n_keeps_the_first_names_and_folds_the_rest() -> None:
    replica = ScriptedReplica("r0")
    async with serving(replica.app) as (url, _):
        config = _config(
            url, 6, adapter_labels="first_n", adapter_label_limit=2, tenant_label_limit=1
        )
        async with running_gateway(config, port=0) as gw:
            # The config file's first two, lora-0 and lora-1, keep their names (whichever
            # came first here: lora-3 did); the base model is never folded; lora-2 to lora-5
            # are __other__ however often they come.
            await _traffic(
                gw.url,
                [
                    ("lora-3", 0, True),
                    ("lora-1", 1, False),
                    (BASE, 2, True),
                    ("lora-0", 2, True),
                    ("lora-4", 1, False),
                    ("lora-5", 0, True),
                    ("lora-4", 1, False),
                    ("lora-3", 0, False),
                ],
            )
            after = await scrape(gw.url)
    assert _by(after, "loragate_requests_total", "adapter") == {
        "lora-0": 1, "lora-1": 1, "": 1, OTHER: 5,
    }  # fmt: skip
    # TTFT of the streams: lora-3, base, lora-0, lora-5.
    assert _by(after, "loragate_ttft_by_adapter_seconds_count", "adapter") == {
        "lora-0": 1, "": 1, OTHER: 2,
    }  # fmt: skip
    # Whole answers without a stream: lora-1, lora-4 twice, lora-3.
    assert _by(after, "loragate_request_duration_by_adapter_seconds_count", "adapter") == {
        "lora-1": 1, OTHER: 3,
    }  # fmt: skip
    # Tenants, limit 1: t0 is the file's first; t1 and t2 are folded.
    assert _by(after, "loragate_ttft_by_tenant_seconds_count", "tenant") == {"t0": 2, OTHER: 2}
    assert _by(after, "loragate_request_duration_by_tenant_seconds_count", "tenant") == {
        "t0": 1, OTHER: 3,
    }  # fmt: skip
    # Every histogram's +Inf bucket holds its count.
    inf = {
        d["adapter"]: v
        for (name, pairs), v in after.items()
        if name == "loragate_ttft_by_adapter_seconds_bucket" and (d := dict(pairs))["le"] == "+Inf"
    }
    assert inf == {"lora-0": 1, "": 1, OTHER: 2}
    # How many names are named and how many folded (the file's too), so the limit can be sized.
    names = {
        (d["label"], d["kind"]): v
        for (name, pairs), v in after.items()
        if name == "loragate_metric_label_names" and (d := dict(pairs))
    }
    assert names == {
        ("adapter", "own"): 2, ("adapter", "other"): 4,
        ("tenant", "own"): 1, ("tenant", "other"): 2,
    }  # fmt: skip


async def test_none_folds_every_adapter_and_tenant_all_names_each() -> None:
    replica = ScriptedReplica("r0")
    calls = [("lora-0", 0, True), ("lora-1", 1, False), (BASE, 2, False), ("lora-2", 2, True)]
    async with serving(replica.app) as (url, _):
        config = _config(url, 3, adapter_labels="none", tenant_labels="none")
        async with running_gateway(config, port=0) as gw:
            await _traffic(gw.url, calls)
            folded = await scrape(gw.url)
        config = _config(url, 3, adapter_labels="all", tenant_labels="all")
        async with running_gateway(config, port=0) as gw:
            await _traffic(gw.url, calls)
            named = await scrape(gw.url)
    assert _by(folded, "loragate_requests_total", "adapter") == {OTHER: 3, "": 1}
    assert _by(folded, "loragate_ttft_by_adapter_seconds_count", "adapter") == {OTHER: 2}
    assert _by(folded, "loragate_ttft_by_tenant_seconds_count", "tenant") == {OTHER: 2}
    assert _by(folded, "loragate_request_duration_by_adapter_seconds_count", "adapter") == {
        OTHER: 1, "": 1,
    }  # fmt: skip
    assert _by(named, "loragate_requests_total", "adapter") == {
        "lora-0": 1, "lora-1": 1, "lora-2": 1, "": 1,
    }  # fmt: skip
    assert _by(named, "loragate_ttft_by_tenant_seconds_count", "tenant") == {"t0": 1, "t2": 1}
    assert _by(named, "loragate_request_duration_by_tenant_seconds_count", "tenant") == {
        "t1": 1, "t2": 1,
    }  # fmt: skip


async def test_a_successful_streams_whole_duration_is_observed() -> None:
    """Before, a stream a replica began was in no duration histogram: only its TTFT."""
    replica = ScriptedReplica("r0")
    async with serving(replica.app) as (url, _), running_gateway(_config(url, 2), port=0) as gw:
        await _traffic(gw.url, [("lora-0", 0, True), (BASE, 1, True), ("lora-1", 0, False)])
        after = await scrape(gw.url)
    streams = {
        (d["status_class"], d["residency"]): v
        for (name, pairs), v in after.items()
        if name == "loragate_stream_duration_seconds_count" and (d := dict(pairs))
    }
    assert streams == {("2xx", "unregistered"): 1, ("2xx", "base"): 1}
    # From arrival to the stream's end: at least its TTFT.
    stream_sum = sum(_by(after, "loragate_stream_duration_seconds_sum", "residency").values())
    ttft_sum = sum(_by(after, "loragate_ttft_by_residency_seconds_sum", "residency").values())
    assert stream_sum >= ttft_sum > 0
    # The answer without a stream stays in loragate_request_duration_seconds alone.
    assert _by(after, "loragate_request_duration_seconds_count", "status_class") == {"2xx": 1}


async def test_a_reload_keeps_the_label_modes_until_a_restart(tmp_path: Path) -> None:
    """Which names have their own series must not change under a running Prometheus: a
    reload that changes the label modes says so (restart_required) and keeps them; the
    section's other keys apply."""
    replica = ScriptedReplica("r0")
    path = tmp_path / "gw.yaml"
    auth = {"Authorization": "Bearer reload-token"}

    def write(**metrics: Any) -> None:
        doc = {
            "base_model": BASE,
            "replicas": [{"id": "r0", "url": replica.url}],
            "adapters": [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(2)],
            "tenants": TENANTS,
            "poller": {"interval_s": 3600},
            "admin": {"token": "reload-token"},
            "metrics": metrics,
        }
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    async with serving(replica.app) as (url, _):
        replica.url = url
        write(adapter_labels="first_n", adapter_label_limit=1)
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            aiohttp.ClientSession() as http,
        ):
            await _traffic(gw.url, [("lora-0", 0, False), ("lora-1", 0, False)])
            write(adapter_labels="all", tenant_labels="none", loop_lag_warning_s=2)
            async with http.post(gw.url + "/admin/reload", headers=auth) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["restart_required"] == [
                "metrics.adapter_labels", "metrics.adapter_label_limit", "metrics.tenant_labels",
            ]  # fmt: skip
            metrics = gw.gateway.config.metrics
            assert (metrics.adapter_labels, metrics.adapter_label_limit) == ("first_n", 1)
            assert metrics.tenant_labels == "first_n"
            assert metrics.loop_lag_warning_s == 2  # applied
            await _traffic(gw.url, [("lora-1", 1, False)])
            after = await scrape(gw.url)
    assert _by(after, "loragate_requests_total", "adapter") == {"lora-0": 1, OTHER: 2}
    assert _by(after, "loragate_request_duration_by_tenant_seconds_count", "tenant") == {
        "t0": 2, "t1": 1,
    }  # fmt: skip


async def test_refused_loads_are_counted_under_the_folded_adapter_label() -> None:
    """r0 refuses every adapter's load; r1 serves them (round robin tries r0 first for
    each). With a limit of 1, lora-0 (the file's first) keeps its name, lora-1 and lora-2 share
    __other__ in loragate_adapter_load_refusals_total as in loragate_requests_total."""
    async with picky_replicas() as (r0, r1):
        r0.refuse = {"lora-0", "lora-1", "lora-2"}
        cfg = gateway_config(
            [r0.url, r1.url],
            routing="round_robin",
            metrics={"adapter_labels": "first_n", "adapter_label_limit": 1},
        )
        async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
            for model in ("lora-1", "lora-0", "lora-2"):
                done = await client.completions.create(model=model, prompt="p", max_tokens=1)
                assert done.choices[0].text == "hi from r1"
            after = await scrape(gw.url)
    assert r0.refused == 3
    refused = {
        (d["adapter"], d["replica"]): v
        for (name, pairs), v in after.items()
        if name == "loragate_adapter_load_refusals_total" and (d := dict(pairs))
    }
    assert refused == {("lora-0", "r0"): 1, (OTHER, "r0"): 2}
    assert _by(after, "loragate_requests_total", "adapter") == {"lora-0": 1, OTHER: 2}


async def test_instances_on_one_config_file_keep_the_same_names() -> None:
    """Two gateways on one config file, whose traffic came in opposite orders, keep the same
    names (the file's first, in file order), so ``sum by (adapter)`` over the instances adds
    one adapter's series to its own. Before, each kept the first names it counted: A lora-5
    and lora-4, B lora-0 and lora-1, and lora-0 was named on B, __other__ on A."""
    replica = ScriptedReplica("r0")
    order = [(f"lora-{i}", i % 3, bool(i % 2)) for i in range(6)]
    async with serving(replica.app) as (url, _):
        config = _config(url, 6, adapter_label_limit=2, tenant_label_limit=1)
        async with (
            running_gateway(config, port=0) as gw_a,
            running_gateway(config, port=0) as gw_b,
        ):
            await _traffic(gw_a.url, order[::-1])
            await _traffic(gw_b.url, order)
            scraped = [await scrape(gw.url) for gw in (gw_a, gw_b)]
    for after in scraped:
        assert _by(after, "loragate_requests_total", "adapter") == {
            "lora-0": 1, "lora-1": 1, OTHER: 4,
        }  # fmt: skip
        # Tenants t1, t0, t2 streamed; t0, t2, t1 did not: t0 is the file's first.
        for family in ("ttft", "request_duration"):
            by_tenant = _by(after, f"loragate_{family}_by_tenant_seconds_count", "tenant")
            assert by_tenant == {"t0": 1, OTHER: 2}, family


async def test_an_adapter_named_like_the_folded_value_is_refused() -> None:
    """``__other__`` is the label value of the folded names: an adapter registered under it
    would add its requests to theirs. POST and PUT /admin/adapters answer 400 naming it (the
    config file's adapters and tenants: tests/core/test_metrics_label_config.py)."""
    replica = ScriptedReplica("r0")
    auth = {"Authorization": "Bearer t0ken"}
    async with serving(replica.app) as (url, _):
        config = gateway_config([url], admin={"token": "t0ken"})
        async with running_gateway(config, port=0) as gw, aiohttp.ClientSession() as http:
            for method, path in (("POST", ""), ("PUT", "/" + OTHER)):
                async with http.request(
                    method,
                    gw.url + "/admin/adapters" + path,
                    json={"name": OTHER, "path": "/loras/x"},
                    headers=auth,
                ) as resp:
                    assert resp.status == 400, method
                    error = (await resp.json())["error"]
                assert error["param"] == "name", error
                assert "'__other__' is reserved" in error["message"], error
            async with http.get(gw.url + "/admin/adapters", headers=auth) as resp:
                names = [a["name"] for a in (await resp.json())["adapters"]]
    assert OTHER not in names and "lora-0" in names


async def test_listed_names_keep_their_values_on_every_instance() -> None:
    """``listed``: the names of ``metrics.adapter_label_names`` / ``tenant_label_names`` keep
    their own value on every instance, whatever the traffic's order, an adapter registered
    through the admin API too (``late``); every other name is ``__other__``."""
    replica = ScriptedReplica("r0")
    order = [(f"lora-{i}", i % 3, bool(i % 2)) for i in range(6)]
    auth = {"Authorization": "Bearer t0ken"}
    async with serving(replica.app) as (url, _):
        adapters = [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(6)]
        metrics = {
            "adapter_labels": "listed",
            "adapter_label_names": ["lora-4", "late", "lora-1"],
            "tenant_labels": "listed",
            "tenant_label_names": ["t2"],
        }
        config = gateway_config(
            [url], adapters=adapters, tenants=TENANTS, metrics=metrics, admin={"token": "t0ken"}
        )
        async with (
            running_gateway(config, port=0) as gw_a,
            running_gateway(config, port=0) as gw_b,
            aiohttp.ClientSession() as http,
        ):
            async with http.post(
                gw_a.url + "/admin/adapters",
                json={"name": "late", "path": "/loras/late"},
                headers=auth,
            ) as resp:
                assert resp.status == 201, await resp.text()
            await _traffic(gw_a.url, [*order[::-1], ("late", 0, False)])
            await _traffic(gw_b.url, order)
            scraped = [await scrape(gw.url) for gw in (gw_a, gw_b)]
    a, b = (_by(after, "loragate_requests_total", "adapter") for after in scraped)
    assert a == {"lora-4": 1, "lora-1": 1, "late": 1, OTHER: 4}
    assert b == {"lora-4": 1, "lora-1": 1, OTHER: 4}
    for after in scraped:
        # Tenants t1, t0, t2 streamed; t0, t2, t1 did not (and t0 asked for late on A).
        assert _by(after, "loragate_ttft_by_tenant_seconds_count", "tenant") == {"t2": 1, OTHER: 2}
        names = {
            (d["label"], d["kind"]): v
            for (name, pairs), v in after.items()
            if name == "loragate_metric_label_names" and (d := dict(pairs))
        }
        assert names == {
            ("adapter", "own"): 3, ("adapter", "other"): 4,
            ("tenant", "own"): 1, ("tenant", "other"): 2,
        }  # fmt: skip


async def test_a_reload_keeps_the_listed_names_until_a_restart(tmp_path: Path) -> None:
    """Changing metrics.adapter_label_names by a reload says restart_required and keeps the
    names in force (lora-0), as a change of the modes does."""
    replica = ScriptedReplica("r0")
    path = tmp_path / "gw.yaml"

    def write(names: list[str]) -> None:
        doc = {
            "base_model": BASE,
            "replicas": [{"id": "r0", "url": replica.url}],
            "adapters": [{"name": f"lora-{i}", "path": f"/loras/lora-{i}"} for i in range(2)],
            "tenants": TENANTS,
            "poller": {"interval_s": 3600},
            "admin": {"token": "reload-token"},
            "metrics": {"adapter_labels": "listed", "adapter_label_names": names},
        }
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")

    async with serving(replica.app) as (url, _):
        replica.url = url
        write(["lora-0"])
        async with (
            running_gateway(load_config(path), port=0, config_path=path) as gw,
            aiohttp.ClientSession() as http,
        ):
            write(["lora-1"])
            async with http.post(
                gw.url + "/admin/reload", headers={"Authorization": "Bearer reload-token"}
            ) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert body["restart_required"] == ["metrics.adapter_label_names"]
            assert gw.gateway.config.metrics.adapter_label_names == ("lora-0",)
            await _traffic(gw.url, [("lora-0", 0, False), ("lora-1", 0, False)])
            after = await scrape(gw.url)
    assert _by(after, "loragate_requests_total", "adapter") == {"lora-0": 1, OTHER: 1}
