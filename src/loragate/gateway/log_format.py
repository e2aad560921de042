"""The gateway's log output: text lines (the default) or one JSON object per line.

``loragate serve --log-format json`` (or ``LORAGATE_LOG_FORMAT=json``; the option wins) writes
each record as ``{"time", "level", "logger", "message"}`` plus ``request_id`` when the record
is about a request and ``exception`` / ``stack`` when it carries a traceback: a log pipeline
can then select a request's lines by a field rather than by parsing the text. The message is
the same text either way. A record is about a request when its log call says so: it passes
the id as ``extra=core.log_fields.about_request(id)`` (the lines whose text names the request
otherwise, or not at all: an adapter load's, a config reload's), or its format names it as a
``request %s`` argument (the access log and most per-request lines).
"""

from __future__ import annotations

import datetime
import json
import logging
import re

from loragate.core.log_fields import REQUEST_ID

FORMATS = ("text", "json")
ENV = "LORAGATE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# "request %s" in a log call's format (at its start, or after a space or a parenthesis): the
# argument in that place is the request's id. Read from the format, not from the message, so
# that an id with any printable characters (a client's X-Request-Id) is taken whole.
_REQUEST = re.compile(r"(?:^|[\s(])request %s")
# printf-style placeholders of a format string ("%%" is none).
_PLACEHOLDER = re.compile(r"%(?:%|[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa])")


def request_id_of(record: logging.LogRecord) -> str | None:
    """The request id its log call gave a record (``extra``), else the one its message names
    (``request <id>``, from its format's arguments), or None."""
    given = record.__dict__.get(REQUEST_ID)
    if given is not None:
        return str(given)
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple) or not args:
        return None
    found = _REQUEST.search(msg)
    if found is None:
        return None
    before = msg[: found.end() - 2]  # up to the id's own "%s"
    index = sum(1 for p in _PLACEHOLDER.findall(before) if p != "%%")
    return str(args[index]) if index < len(args) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_of(record)
        if request_id is not None:
            doc["request_id"] = request_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's one handler (stderr) at ``level``, writing ``log_format`` (one of
    ``FORMATS``)."""
    if log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
