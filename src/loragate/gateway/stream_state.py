"""The state of one stream being relayed to its client: what the replica's answer has shown so
far and what the relay must do with what it reads next. ``Proxy._pipe`` is the I/O loop around
it (reads, writes, the response head, the client leaving, the shutdown's cut); this module does
no I/O, reads no clock and logs nothing.

* Lines: only whole lines are relayed (the end of a line that a read cut in two waits for the
  next read), so that a stream breaking off leaves the client with whole events plus one clear
  error event, not a half JSON line its SSE parser would choke on. A "line" longer than
  ``MAX_HELD_BYTES`` is relayed without its end (nothing waits without bound).
* Holding (``hold``: another replica could take the request): the events that carry nothing of
  the request's output (a chat's role chunk, a usage chunk: ``engine_failures.before_output``)
  wait for the first one that does, and go out with it (the relay sends the response head with
  them). If the replica stopped the request before that (vLLM's ``[DONE]``, an abort chunk
  without text, its engine's error event; the stream broke off, or ended without ``[DONE]``),
  :meth:`StreamState.read`, :meth:`StreamState.end` or :meth:`StreamState.stopped_by` say so
  (:attr:`StreamState.stopped` says how): nothing reached the client, the relay may send the
  request to another replica, or relay what was held (:meth:`StreamState.release`). A read
  that timed out is no stop: the replica may still be working on the request.
* Checks of what is relayed: an error event of the replica's own (its engine died) or
  ``finish_reason: "abort"`` (it is stopping) make the stream a ``stream_error``, relayed as
  is; a stream that reaches ``[DONE]`` with neither a token nor a finish reason gets an error
  event before it (vLLM's answer to a request it stopped before the request produced any: an
  empty answer that ended well, else), and so does one whose body ends without ``[DONE]``
  before any of them. So does one whose body ends without ``[DONE]`` after output, unless its
  last bytes relayed hold a finish reason (the answer is whole; with several choices, or a
  usage chunk after the finish reasons, only the last read is looked at): vLLM ends every
  stream with ``[DONE]`` (after its own error event too), so a body that ends without it was
  cut short on its way, and relayed as is the client would take a truncated answer for a whole
  one (the openai SDK ends its iteration quietly). :attr:`StreamState.warning` says what the
  log should.
* The end: :attr:`StreamState.done` says that the bytes to relay reached the stream's
  ``data: [DONE]`` line (some bytes to relay ended with it): once those went out, the client
  has the whole answer, and one that goes away then (a client that stops reading at ``[DONE]``
  and closes) left nothing unread but the end of the body's framing.

Each chunk is scanned once: while held, ``engine_failures.read_before_output`` reads its lines
up to the event that decides, and the checks read on from there (from the line after it when
it was a token's text or a finish reason: nothing else to find in it); once the first token or
finish reason went by, a chunk costs two substring searches (an error event, an abort).
"""

from __future__ import annotations

from loragate.backends.engine_failures import (
    ABORT,
    DONE_EVENT,
    ERROR_EVENT,
    NOTHING_YET,
    UNANSWERED_MESSAGE,
    aborted,
    answered,
    done_at,
    error_event_text,
    finished,
    read_before_output,
)
from loragate.core.errors import (
    LoragateError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from loragate.gateway.errors import sse_error_event

MAX_HELD_BYTES = 1 << 16  # a line, or the events held before the first output, up to this
# The status label in loragate_requests_total of a stream that broke off or that the replica
# ended unfinished (an error event, an abort, no answer).
STREAM_ERROR = "stream_error"
OK = "200"
_ENDED_UNANSWERED = "ended the stream without [DONE] before the request produced a token"
_ENDED_CUT_SHORT = (
    "ended the stream without [DONE] and without a finish reason: its answer may be cut short"
)
# How relayed bytes end when their last line is the stream's [DONE] (its event's blank line may
# come with it or in the next read; the body may end without a newline after it).
_DONE_ENDINGS = tuple(DONE_EVENT + end for end in (b"\n\n", b"\n", b"\r\n\r\n", b"\r\n", b""))


class StreamState:
    """One relayed stream's state (see the module docstring). ``replica``: its id, for the
    error event the client gets when the replica ended the stream unanswered."""

    __slots__ = (
        "_check_from",
        "_cut",
        "_held",
        "answered",
        "done",
        "holding",
        "last",
        "outcome",
        "relayed",
        "replica",
        "stopped",
        "warning",
    )

    def __init__(self, replica: str, hold: bool) -> None:
        self.replica = replica
        # Events without output wait for the first with output (``hold``), until released.
        self.holding = hold
        # A token's text, a finish reason or the replica's own error was relayed.
        self.answered = False
        self.done = False  # the bytes to relay reached the stream's [DONE] line
        self.outcome = OK  # the status label so far: OK or STREAM_ERROR
        self.relayed = 0  # bytes relayed
        self.last = b""  # the last bytes relayed (an error event of ours must start an event)
        self.stopped = ""  # why the replica stopped the request before any output
        self.warning = ""  # what the checks found for the log (the relay clears it)
        self._cut = b""  # the start of a line a read cut in two
        self._held = b""  # the events without output held so far
        self._check_from = 0  # where the checks of ``_held`` start (once stopped)

    def read(self, chunk: bytes, last: bool = False) -> bytes | None:
        """What to relay now of ``chunk`` (the next bytes read; not empty): its whole lines
        unless they are held (b"": nothing now); with ``last`` (the answer's last bytes), all
        that is left (:meth:`end`). None: the replica stopped the request before any output
        (:attr:`stopped` says how; nothing was relayed): :meth:`release` relays what was held
        if the request is not sent to another replica."""
        cut = self._cut
        if cut:
            chunk, self._cut = cut + chunk, b""
        if not chunk.endswith(b"\n"):
            at = chunk.rfind(b"\n") + 1
            if at or len(chunk) < MAX_HELD_BYTES:
                chunk, self._cut = chunk[:at], chunk[at:]
        if not chunk:
            data: bytes | None = b""
        elif self.holding:
            data = self._first_output(chunk)
        else:
            data = self._checked(chunk, 0)
        if last and data is not None:
            rest = self.end()
            return None if rest is None else data + rest
        return data

    def end(self) -> bytes | None:
        """At the end of the answer's body: what is left to relay (the line it ended without
        a newline), b"" if nothing, or None as :meth:`read`: also if the stream ended without
        ``[DONE]`` before any output, while held (cut short: the replica may have stopped
        before it wrote the rest). Not held, such a stream ends with an error event, as one
        that reached ``[DONE]`` so does: the client would read an empty answer."""
        if not self.holding:
            return self._rest()
        cut, self._cut = self._cut, b""
        data = self._first_output(cut) if cut else b""
        if data:  # released by its last line
            return data + self._rest()
        if data is not None:
            self.stopped = _ENDED_UNANSWERED
        return None

    def stopped_by(self, exc: UpstreamError) -> bool:
        """Whether the read that failed with ``exc`` stopped the request before any output,
        as a replica stopping does (:attr:`stopped` says how): while held (nothing reached the
        client), unless it timed out (the replica may still be working on the request)."""
        if not self.holding or isinstance(exc, UpstreamTimeoutError):
            return False
        self.stopped = f"broke off the stream before the request produced a token: {exc.message}"
        return True

    def release(self, last: bool = False) -> bytes:
        """Stop holding: what was held, checked, to relay now; with ``last`` (the body
        ended), all that is left (see :meth:`end`)."""
        held, self._held, self.holding = self._held, b"", False
        data = self._checked(held, self._check_from) if held else b""
        return data + self._rest() if last else data

    def broke_off(self, err: LoragateError) -> bytes:
        """The stream broke off (``err`` says how): what to relay to end it, what was held and
        an error event (the client reads whole events only); a ``stream_error``."""
        held = self.release() if self.holding else b""
        self.outcome = STREAM_ERROR
        return held + self.closing(err)

    def closing(self, err: LoragateError) -> bytes:
        """``err`` as the error event that ends the stream after what was relayed."""
        end = _event_break(self.last) + sse_error_event(err)
        self.last = end
        return end

    def _first_output(self, lines: bytes) -> bytes | None:
        """:meth:`read` while holding."""
        said, check_from, answer = read_before_output(lines)
        held = self._held
        if said == NOTHING_YET:
            if len(held) + len(lines) < MAX_HELD_BYTES:
                self._held = held + lines
                return b""
        elif said:  # stopped before any output
            self.stopped = said
            self._held, self._check_from = held + lines, len(held) + check_from
            return None
        self._held, self.holding = b"", False
        self.answered = answer
        return self._checked(held + lines if held else lines, len(held) + check_from)

    def _checked(self, data: bytes, start: int) -> bytes:
        """``data`` (whole lines) to relay, read from ``start`` on (what is before it was read
        already): a ``stream_error`` if it holds the replica's error event or its abort; with
        an error event before its ``[DONE]`` if no token or finish reason came before."""
        if self.outcome != STREAM_ERROR:
            error_at = data.find(ERROR_EVENT, start)
            if error_at >= 0 or data.find(ABORT, start) >= 0:
                # The replica ended the stream unfinished (relayed as is): an error event (its
                # engine died), or finish_reason abort (it is stopping).
                why = (
                    f"sent an error event: {error_event_text(data[error_at:])}"
                    if error_at >= 0
                    else "aborted it (finish_reason 'abort': it is stopping)"
                    if aborted(data)
                    else ""  # a token that is "abort"
                )
                if why:
                    self.outcome = STREAM_ERROR
                    self.warning = (
                        f"{why} (after {self.relayed} bytes of its stream, relayed as is)"
                    )
        if not self.answered:  # (a scan of the first chunks only)
            self.answered = self.outcome == STREAM_ERROR or answered(data, start)
            if not self.answered and (at := done_at(data, start)) >= 0:
                data = self._unanswered(data, at)
        if data.endswith(_DONE_ENDINGS):
            self.done = True
        self.relayed += len(data)
        self.last = data
        return data

    def _unanswered(self, data: bytes, at: int) -> bytes:
        """``data`` with an error event before its ``[DONE]`` (at ``at``): the replica ended
        the stream with neither a token nor a finish reason, as vLLM ends one it stopped
        before the request produced a token (``engine_failures``); relayed as is, the client
        would read an empty answer that ended well."""
        err = self._ended_unanswered(UNANSWERED_MESSAGE)
        head = data[:at]
        return head + _event_break(head or self.last) + sse_error_event(err)

    def _rest(self) -> bytes:
        """Not held, at the end of the body: the line it ended without a newline, and the
        error event of a stream that ended without ``[DONE]`` and without a token or a finish
        reason (relayed as is, the client would read an empty answer), or with a token but
        no finish reason in the last bytes relayed (a truncated answer that ended well)."""
        cut, self._cut = self._cut, b""
        data = self._checked(cut, 0) if cut else b""
        if self.outcome == STREAM_ERROR or self.done:
            return data
        if not self.answered:
            return data + self.closing(self._ended_unanswered(_ENDED_UNANSWERED))
        if finished(self.last):
            return data
        return data + self.closing(self._ended_unanswered(_ENDED_CUT_SHORT))

    def _ended_unanswered(self, how: str) -> UpstreamConnectError:
        """The replica ended the stream ``how``: before any token or finish reason, or cut
        short; a ``stream_error``, logged; the error the client's event carries."""
        self.outcome = STREAM_ERROR
        self.warning = (
            f"{how} (after {self.relayed} bytes of its stream; the client gets an error event)"
        )
        return UpstreamConnectError(f"replica {self.replica} {how}")


def _event_break(last: bytes) -> bytes:
    """What ends the SSE event in progress after ``last`` (the last bytes relayed), so that an
    error event written next stands on its own. The client has whole lines only (a line cut
    short is never relayed)."""
    if not last or last.endswith(b"\n\n"):
        return b""
    return b"\n" if last.endswith(b"\n") else b"\n\n"
