"""How a vLLM 0.32 replica says that its engine failed a request it had accepted, read from
the answers the proxy relays.

* Before any byte of the answer went out (a non-streaming request, or a stream whose
  generation had not started): a 500 with vLLM's error body. When the engine dies or the
  replica shuts down with requests in flight (SIGTERM, ``--shutdown-timeout 0``, the default:
  the engine core aborts them and is killed), vLLM's ``engine_error_handler`` answers each with
  ``EngineDeadError``'s words, "EngineCore encountered an issue. See stack trace (above) for
  the root cause.", type ``InternalServerError``; the simulated replica (``loragate.twin``)
  says "The engine stopped before the request finished." / "The engine stopped: ...". The
  generation was aborted and nothing reached the client: the request may be sent again.
* After a stream started: an in-band SSE event ``data: {"error": {...}}`` (the 200 is out),
  followed by ``data: [DONE]``. A JSON string cannot hold an unescaped quote, so the bytes
  ``data: {"error"`` occur only where an event starts with an ``error`` key.
"""

from __future__ import annotations

import json

# The start of the message of an engine that stopped under a request: vLLM's EngineDeadError,
# the simulated replica's.
_ENGINE_STOPPED = ("EngineCore encountered an issue", "The engine stopped")
# An SSE event whose JSON starts with an "error" key (vLLM's create_streaming_error_response,
# written as f"data: {json}\n\n" with json.dumps' default separators; the twin's the same).
ERROR_EVENT = b'data: {"error"'
_MAX_QUOTED = 300  # an error event quoted in a log line is cut here


def engine_stopped(status: int, body: bytes) -> str | None:
    """The replica's message if ``status``/``body`` say its engine stopped under the request
    (see the module docstring), else None."""
    if status != 500:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message.startswith(_ENGINE_STOPPED):
        return message
    return None


def error_event_text(chunk: bytes) -> str:
    """The first error event in ``chunk`` (whole SSE lines holding ``ERROR_EVENT``), as text
    for a log line (cut if long)."""
    line = chunk[max(chunk.find(ERROR_EVENT), 0) :].split(b"\n", 1)[0]
    text = line.decode("utf-8", "replace")
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."
