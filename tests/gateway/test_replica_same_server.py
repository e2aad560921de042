"""One vLLM server listed under two names (``127.0.0.1`` and ``localhost``): the config cannot
tell without resolving names (it refuses only the same URL twice), so the gateway resolves
them once at start-up and logs a WARNING naming both replicas."""

from __future__ import annotations

import logging

import pytest
from gateway_harness import ScriptedReplica, gateway_config, wait_until
from log_lines import same_server_warnings

from loragate.core.config import config_from_mapping
from loragate.gateway import running_gateway
from loragate.gateway.app import warn_same_servers


async def test_two_names_of_one_server_are_warned_about_at_start_up(
    replicas: list[ScriptedReplica], caplog: pytest.LogCaptureFixture
) -> None:
    url = replicas[0].url
    assert url.startswith("http://127.0.0.1:")
    alias = url.replace("127.0.0.1", "localhost") + "/"
    cfg = gateway_config([url, replicas[1].url, alias])  # r0, r1, r2 (= r0)
    caplog.set_level(logging.WARNING, logger="loragate.gateway.app")
    async with running_gateway(cfg, port=0):
        await wait_until(lambda: same_server_warnings(caplog), "the same-server warning")
    (message,) = same_server_warnings(caplog)
    assert f"replicas r0 ({url}) and r2 ({alias.rstrip('/')})" in message
    assert "127.0.0.1 port" in message


async def test_different_servers_and_unresolvable_names_are_not_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    doc = {
        "base_model": "m",
        "replicas": [
            "http://127.0.0.1:18101",
            "http://localhost:18102",
            "http://127.0.0.1:18101/other",
            "http://no-such-host.invalid:18101",
        ],
    }
    caplog.set_level(logging.WARNING, logger="loragate.gateway.app")
    await warn_same_servers(config_from_mapping(doc).replicas)
    assert not same_server_warnings(caplog)
