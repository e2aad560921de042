"""A gateway's counters as the stream tests read them from its /metrics."""

from __future__ import annotations

import re

import aiohttp


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
