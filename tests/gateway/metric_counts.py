"""A gateway's /metrics as the tests read it: its text, every sample parsed by
prometheus_client's own parser, and the counters the stream tests count."""

from __future__ import annotations

import re

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Every sample of a /metrics page: value by (sample name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def counts(http: aiohttp.ClientSession, url: str, name: str) -> dict[tuple[str, str], int]:
    """``name``'s non-zero samples at the gateway ``url``, by (replica, status or reason)."""
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    found = {}
    for labels, n in re.findall(name + r"\{([^}]*)\} (\S+)", text):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if float(n):
            found[label["replica"], label.get("status") or label["reason"]] = int(float(n))
    return found


async def metrics_text(url: str) -> str:
    """The /metrics page of the gateway ``url``, read with a session of its own."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        return await resp.text()


async def scrape(url: str) -> Samples:
    """Every sample of the gateway's /metrics (asserted answered 200), by (sample name, sorted
    labels)."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
