"""How many series a gateway's ``/metrics`` holds after traffic for many adapters and tenants
(``metrics.adapter_labels`` / ``metrics.tenant_labels``): the cardinality an SRE weighs
before scraping it.

Run::

    .venv/bin/python bench/metrics_series.py --adapters 1000 --tenants 100
    .venv/bin/python bench/metrics_series.py --src /tmp/old/src --modes default   # another tree

Set-up (127.0.0.1, ephemeral ports, every child stopped at the end): one instant upstream
(``bench/_instant_upstream.py``: answers any adapter at once, every load a 200) and, for each
mode, ``loragate serve`` (the tree of ``--src``, default this checkout's) with ``--adapters``
adapters and ``--tenants`` tenants (adapter i belongs to tenant i mod tenants), ``metrics:``
set to that mode (``default``: no label keys, whatever the tree's default is). Each adapter
gets one request without a stream and one stream, with its tenant's API key; then
``/metrics`` is scraped once and its samples counted: in all, and by family for the families
with an ``adapter`` or ``tenant`` label (a histogram's samples are its buckets, ``_sum`` and
``_count``: 17 per label set). The gateway's own process collectors are in the total too.

Results (1,000 adapters, 100 tenants; ``--modes default`` with ``--src`` at a650e90, the
tree before the label modes, then this tree at 9f1954e)::

    tree / mode          samples   with an adapter or tenant label
    a650e90 (no modes)     1,242   1,000 (loragate_requests_total: one per adapter)
    first_n (default)      1,712   1,449 (21 adapter values, 21 tenant values: 20 + __other__;
                                          4 histograms x 21 x 17 + 21 counters)
    all                   38,663  38,400 (17,000 per per-adapter histogram)
    none                     332      69
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from _child_process import child, drain, line_matching

HERE = Path(__file__).resolve().parent
MODES = {
    "default": None,
    "all": {"adapter_labels": "all", "tenant_labels": "all"},
    "first_n": {"adapter_labels": "first_n", "tenant_labels": "first_n"},
    "none": {"adapter_labels": "none", "tenant_labels": "none"},
}


def _config(port: int, n: int, tenants: int, metrics: dict[str, str] | None) -> dict[str, object]:
    doc: dict[str, object] = {
        "base_model": "bench-model",
        "replicas": [{"id": "r0", "url": f"http://127.0.0.1:{port}"}],
        "adapters": [
            {"name": f"lora-{i}", "path": f"/loras/lora-{i}", "tenants": [f"t{i % tenants}"]}
            for i in range(n)
        ],
        "tenants": [{"name": f"t{j}", "api_keys": [f"sk-{j}"]} for j in range(tenants)],
        "poller": {"interval_s": 3600},
    }
    if metrics is not None:
        doc["metrics"] = metrics
    return doc


async def _measure(src: str, mode: str, n: int, tenants: int) -> tuple[int, Counter[str]]:
    env = dict(os.environ, PYTHONPATH=src)
    upstream = [sys.executable, str(HERE / "_instant_upstream.py"), "--replicas", "1"]
    async with child(upstream, env) as up:
        port = int(
            (await line_matching(up.stdout, r"PORTS (\d+)", lines=200, line_timeout_s=60)).group(1)
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gw.yaml"
            path.write_text(yaml.safe_dump(_config(port, n, tenants, MODES[mode])))
            serve = [sys.executable, "-m", "loragate.cli", "serve", "--config", str(path),
                     "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
            async with child(serve, env) as gw:
                url = (
                    await line_matching(
                        gw.stderr, r"listening on (http://\S+)", lines=200, line_timeout_s=60
                    )
                ).group(1)
                reader = asyncio.create_task(drain(gw.stderr))
                async with aiohttp.ClientSession() as http:
                    for i in range(n):
                        auth = {"Authorization": f"Bearer sk-{i % tenants}"}
                        for stream in (False, True):
                            body = {"model": f"lora-{i}", "prompt": "p", "max_tokens": 2,
                                    "stream": stream}  # fmt: skip
                            async with http.post(
                                url + "/v1/completions", json=body, headers=auth
                            ) as resp:
                                await resp.read()
                                if resp.status != 200:
                                    raise RuntimeError(f"lora-{i}: {resp.status}")
                    async with http.get(url + "/metrics") as resp:
                        text = await resp.text()
                reader.cancel()
    total = 0
    labelled: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            total += 1
            if "adapter" in sample.labels or "tenant" in sample.labels:
                labelled[family.name] += 1
    return total, labelled


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--src", default=str(HERE.parent / "src"), help="the loragate src/ to run")
    p.add_argument("--modes", default="default,all,first_n,none", help="comma-separated")
    args = p.parse_args()
    print(f"{args.adapters} adapters, {args.tenants} tenants, src {args.src}")
    for mode in args.modes.split(","):
        total, labelled = await _measure(args.src, mode, args.adapters, args.tenants)
        print(f"\nmode {mode}: {total} samples in /metrics, "
              f"{sum(labelled.values())} with an adapter or tenant label")  # fmt: skip
        for name, count in sorted(labelled.items()):
            print(f"  {name:50} {count:6}")


if __name__ == "__main__":
    asyncio.run(main())
