"""The gateway tests' ``openai`` clients exist only inside ``async with``, which closes them:
a client left open is finalized during some later test, which then fails in its place."""

from __future__ import annotations

from gateway_harness import BASE, ScriptedReplica, openai_client
from shared_cluster import sdk


async def test_the_harness_clients_are_given_only_by_async_with(
    replicas: list[ScriptedReplica],
) -> None:
    url = replicas[0].url
    for make in (openai_client, sdk):
        assert not hasattr(make(url), "completions"), make  # not a client to use as is
        async with make(url) as client:
            assert [m.id async for m in client.models.list()] == [BASE]
        assert client.is_closed(), make
