"""Warnings about a config that loads but may not do what the operator meant, logged when it
comes into force: at start-up and at every reload (``gateway.app``, ``gateway.reload``).

A file's ``admin.token`` / ``metrics.token`` overridden by ``LORAGATE_ADMIN_TOKEN`` /
``LORAGATE_METRICS_TOKEN`` (``core.config`` decides which one is in force; neither token is
ever logged).
"""

from __future__ import annotations

import logging

from loragate.core.config import ADMIN_TOKEN_ENV, METRICS_TOKEN_ENV, GatewayConfig

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
