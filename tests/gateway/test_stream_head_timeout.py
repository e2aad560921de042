"""Which limit ends the wait for a replica's response head (real loopback sockets, a replica
that never answers): a stream's waits ``limits.stream_read_timeout_s``, as every silence of the
stream (vLLM sends a stream's head at once; its queue and prefill come before the first chunk),
a non-streaming request's ``limits.request_timeout_s``; either is a 504 ``upstream_timeout``.
The other limit is set far beyond the client's own timeout (30 s): had it applied, the client
would have timed out instead of getting the 504. (The config's comments and
examples/gateway.yaml said the head of a stream waited request_timeout_s.)"""

from __future__ import annotations

import openai
import pytest
from gateway_harness import BASE, ScriptedReplica, gateway_config, openai_client

from loragate.gateway import running_gateway

_FAR_S = 3600  # beyond the openai client's 30 s timeout


@pytest.mark.parametrize(
    ("stream", "limits"),
    [
        (True, {"stream_read_timeout_s": 0.3, "request_timeout_s": _FAR_S}),
        (False, {"request_timeout_s": 0.3, "stream_read_timeout_s": _FAR_S}),
    ],
)
async def test_the_wait_for_a_head_is_bounded_by_its_kinds_limit(
    replicas: list[ScriptedReplica], stream: bool, limits: dict[str, float]
) -> None:
    replicas[0].mode = "hang"  # no head, nothing
    cfg = gateway_config([replicas[0].url], limits=limits)
    async with running_gateway(cfg, port=0) as gw, openai_client(gw.url) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            await client.completions.create(model=BASE, prompt="p", stream=stream)
    assert raised.value.status_code == 504
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["code"] == "upstream_timeout"
    assert body["message"] == "replica r0: did not answer in time"
