"""gateway.stream_state.StreamState on its own (no sockets: its decisions, byte for byte). The
relay around it is tested over loopback in test_stream_retry*.py, test_stream_unanswered.py
and test_gateway_robustness_upstream.py."""

from __future__ import annotations

import json

from sse_answers import DONE, ROLE

from loragate.backends.engine_failures import ABORTED_UNANSWERED_MESSAGE, UNANSWERED_MESSAGE
from loragate.core.errors import UpstreamConnectError, UpstreamTimeoutError
from loragate.gateway.stream_state import STREAM_ERROR, StreamState

_TOKEN = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" a"},"logprobs":null,"finish_reason":null}]}\n\n'
)
_ABORT = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":'
    b'[{"index":0,"text":"","logprobs":null,"finish_reason":"abort","stop_reason":null}]}\n\n'
)


def _error(data: bytes) -> str:
    """The message of the error event before ``data``'s final ``[DONE]``."""
    events = [e for e in data.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    message: str = json.loads(events[-2].removeprefix(b"data: "))["error"]["message"]
    return message


def test_only_whole_lines_are_relayed() -> None:
    state = StreamState("r0", False)
    assert state.read(_TOKEN[:10]) == b""
    assert state.read(_TOKEN[10:-1]) == _TOKEN[:-1]  # the blank line's end is still to come
    assert state.read(b"\n") == b"\n"
    assert state.answered and state.outcome == "200"


def test_a_held_stream_goes_out_with_its_first_output() -> None:
    state = StreamState("r0", True)
    assert state.read(ROLE) == b""
    assert state.read(_TOKEN + DONE) == ROLE + _TOKEN + DONE
    assert not state.holding and state.answered and state.relayed == len(ROLE + _TOKEN + DONE)


def test_stopped_before_any_output_then_released_when_no_replica_can_take_it() -> None:
    state = StreamState("r0", True)
    assert state.read(ROLE) == b""
    assert state.read(DONE) is None
    assert state.stopped == UNANSWERED_MESSAGE
    data = state.release(last=True)
    assert data.startswith(ROLE) and data.endswith(DONE)
    assert _error(data) == f"replica r0 {UNANSWERED_MESSAGE}"
    assert state.outcome == STREAM_ERROR and state.warning


def test_a_held_stream_that_ends_without_done_is_stopped() -> None:
    state = StreamState("r0", True)
    assert state.read(ROLE, last=True) is None
    assert state.stopped.startswith("ended the stream without [DONE]")
    data = state.release(last=True)  # no other replica: the client gets an error event
    assert data.startswith(ROLE)
    assert _error(data) == "replica r0 " + state.stopped


def test_a_stop_released_at_the_end_keeps_a_last_line_without_its_newline() -> None:
    state = StreamState("r0", True)
    cut = b": the end without a newline"
    assert state.read(_ABORT + cut, last=True) is None
    assert state.stopped == ABORTED_UNANSWERED_MESSAGE
    assert state.release(last=True) == _ABORT + cut  # the abort chunk: relayed as is
    assert state.outcome == STREAM_ERROR


def test_a_break_stops_a_held_stream_unless_it_timed_out() -> None:
    broke = UpstreamConnectError("connection closed in the middle of the answer")
    assert not StreamState("r0", True).stopped_by(UpstreamTimeoutError("did not answer in time"))
    assert not StreamState("r0", False).stopped_by(broke)
    state = StreamState("r0", True)
    assert state.read(ROLE) == b""
    assert state.stopped_by(broke)
    assert state.stopped.endswith(": connection closed in the middle of the answer")
    # No other replica: what was held, then the gateway's error event.
    data = state.broke_off(UpstreamConnectError("replica r0 broke off the stream"))
    assert data.startswith(ROLE) and _error(data) == "replica r0 broke off the stream"
    assert state.outcome == STREAM_ERROR


def test_done_says_the_bytes_to_relay_reached_the_streams_done() -> None:
    text_done = _TOKEN.replace(b'" a"', b'" data: [DONE]"')  # a token's text is not the end
    state = StreamState("r0", False)
    assert state.read(text_done) == text_done and not state.done
    assert state.read(DONE[:-1]) == DONE[:-1] and state.done  # its blank line may come later
    assert state.read(b"\n") == b"\n" and state.done
    held = StreamState("r0", True)
    assert held.read(ROLE) == b"" and not held.done
    assert held.read(_TOKEN + DONE) == ROLE + _TOKEN + DONE and held.done
    unanswered = StreamState("r0", False)  # the gateway's error event goes before the [DONE]
    data = unanswered.read(DONE, True)
    assert data is not None and data.endswith(DONE) and unanswered.done
    assert unanswered.outcome == STREAM_ERROR
    cut = StreamState("r0", False)  # a body that ends without a newline after its [DONE]
    assert cut.read(_TOKEN + DONE[:-2]) == _TOKEN and not cut.done
    assert cut.end() == DONE[:-2] and cut.done


def test_a_stream_that_ends_without_done_after_output_but_no_finish_reason_is_cut_short() -> None:
    # vLLM ends every stream with [DONE]: a body that ends without it after tokens, with no
    # finish reason, was cut short on its way; relayed as is, it would end well.
    state = StreamState("r0", False)
    assert state.read(_TOKEN) == _TOKEN
    data = state.end()
    assert data is not None
    assert _error(data) == (
        "replica r0 ended the stream without [DONE] and without a finish reason: its answer "
        "may be cut short"
    )
    assert state.outcome == STREAM_ERROR and state.warning
    # Its last line without a newline: relayed, then the error event.
    cut = StreamState("r0", False)
    assert cut.read(_TOKEN + _TOKEN[:-2], last=True) is not None
    assert cut.outcome == STREAM_ERROR


def test_a_stream_that_ends_without_done_after_its_finish_reason_ends_as_it_came() -> None:
    finish = _TOKEN.replace(b'"finish_reason":null', b'"finish_reason":"length"')
    state = StreamState("r0", False)
    assert state.read(_TOKEN) == _TOKEN
    assert state.read(finish, last=True) == finish  # the whole answer: nothing added
    assert state.outcome == "200" and not state.warning
