from __future__ import annotations

import pytest

from loragate.twin.replica_responses import (
    TokenChunkEncoder,
    chat_chunk,
    completion_chunk,
    new_id,
    sse,
)


@pytest.mark.parametrize("kind", ["completion", "chat"])
@pytest.mark.parametrize("text", [" 25", "", 'quo"te\\', "é�\n"])
def test_token_encoder_matches_plain_rendering(kind: str, text: str) -> None:
    build = chat_chunk if kind == "chat" else completion_chunk
    enc = TokenChunkEncoder(kind=kind, request_id="cmpl-0123456789abcdef", created=7, model="m")
    for index in (0, 3):
        expected = build(
            request_id="cmpl-0123456789abcdef",
            created=7,
            model="m",
            index=index,
            text=text,
            finish_reason=None,
        )
        assert enc.token(index, text) == sse(expected)
        final = build(
            request_id="cmpl-0123456789abcdef",
            created=7,
            model="m",
            index=index,
            text=text,
            finish_reason="length",
            fingerprint=True,
        )
        assert enc.final(index, text, "length", fingerprint=True) == sse(final)
        assert final["system_fingerprint"] == "vllm-0.32.0-3216f9d5"


def test_ids() -> None:
    assert new_id("chat").startswith("chatcmpl-") and len(new_id("chat")) == 9 + 16
    assert new_id("completion").startswith("cmpl-") and new_id("x") != new_id("x")
