"""Raw vLLM-shaped SSE answers for scripted replicas: the pieces of a stream vLLM 0.32 sends
when it stops a request that has produced nothing (its head, a chat's role chunk, a usage
chunk, ``[DONE]``), shared by test_stream_unanswered.py and test_stream_retry.py."""

from __future__ import annotations

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
ROLE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny-llama",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
)
USAGE = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"tiny-llama",'
    b'"choices":[],"usage":{"prompt_tokens":4,"total_tokens":4,"completion_tokens":0}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def chunked(body: bytes) -> bytes:
    """A whole answer: the head and ``body`` as one chunk, then the last chunk."""
    return HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
