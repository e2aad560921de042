"""Warnings about a config that loads but may not do what the operator meant, logged when it
comes into force: at start-up and at every reload (``gateway.app``, ``gateway.reload``).

* a file's ``admin.token`` / ``metrics.token`` overridden by ``LORAGATE_ADMIN_TOKEN`` /
  ``LORAGATE_METRICS_TOKEN`` (``core.config`` decides which one is in force; neither token is
  ever logged);
* two replicas whose URLs resolve to one server (a reload warns of the pairs its added and
  changed replicas make).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Collection, Sequence
from urllib.parse import urlsplit

from loragate.core.config import (
    ADMIN_TOKEN_ENV,
    METRICS_TOKEN_ENV,
    GatewayConfig,
    ReplicaConfig,
)

log = logging.getLogger(__name__)


def warn_ignored_file_tokens(config: GatewayConfig, *, when: str) -> None:
    """One WARNING naming the file's tokens that an environment variable overrides with
    another value (``when``: ``at start-up``, ``at reload``)."""
    pairs = [
        (key, env)
        for key, env, section in (
            ("admin.token", ADMIN_TOKEN_ENV, config.admin),
            ("metrics.token", METRICS_TOKEN_ENV, config.metrics),
        )
        if section.file_token_ignored
    ]
    if not pairs:
        return
    keys, envs = (" and ".join(names) for names in zip(*pairs, strict=True))
    one = len(pairs) == 1
    log.warning(
        "%s: %s in the config file %s ignored because %s %s set to %s (the variable wins "
        "over the file); drop the key from the file, or unset the variable to use the file's",
        when, keys, "is" if one else "are", envs, "is" if one else "are",
        "another token" if one else "other tokens",
    )  # fmt: skip


async def warn_same_servers(
    replicas: Sequence[ReplicaConfig],
    timeout_s: float = 5.0,
    *,
    only: Collection[str] | None = None,
) -> None:
    """Log a WARNING for two replicas whose hosts resolve to one address (same port and path):
    one server listed twice under two names (``localhost`` and ``127.0.0.1``) is modelled as
    two. The config refuses the same URL twice without resolving names (``core.config``);
    this only warns, at start-up and at a reload, off the request path: a name may resolve
    otherwise later, or stand for a balancer in front of several servers. ``only``: warn only
    of pairs with one of these replica ids (a reload's added and changed replicas; None: all)."""
    loop = asyncio.get_running_loop()

    async def endpoints(replica: ReplicaConfig) -> frozenset[tuple[str, int, str]]:
        parts = urlsplit(replica.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM), timeout_s
            )
        except (OSError, TimeoutError):  # unresolvable now: the poller will say so
            return frozenset()
        return frozenset((str(i[4][0]), int(i[4][1]), parts.path.rstrip("/")) for i in infos)

    found = await asyncio.gather(*(endpoints(r) for r in replicas))
    for i, replica in enumerate(replicas):
        for j in range(i):
            if only is not None and not {replica.replica_id, replicas[j].replica_id} & set(only):
                continue
            common = found[i] & found[j]
            if common:
                address, port, _ = min(common)
                log.warning(
                    "replicas %s (%s) and %s (%s) resolve to the same server (%s port %d): "
                    "if they are one vLLM server, list it once (it is modelled as two: two "
                    "shadow residencies, its load counted apart)",
                    replicas[j].replica_id, replicas[j].url, replica.replica_id, replica.url,
                    address, port,
                )  # fmt: skip
