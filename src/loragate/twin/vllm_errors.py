"""vLLM 0.32's error responses: ``{"error": {"message", "type", "param", "code"}}``.

The message texts and ``type`` strings are the ones recorded in
``shared/design/vllm-0.32/transcript_*.md``; request-body validation errors are rendered as
vLLM 0.32's validation handler renders them (``N validation error(s):`` then at most 10 error
dicts, ``loc`` joined with dots, inputs summarised and bounded, the message sanitised), for the
simulated replica and for the gateway's own checks (``gateway.vllm_validation``) alike.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class VllmApiError(Exception):
    """An error the simulated replica answers with, in vLLM's JSON shape. Its message is
    sanitised as vLLM sanitises every error message (``sanitize_message``)."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str,
        param: str | None = None,
        *,
        close_connection: bool = False,
    ) -> None:
        message = sanitize_message(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param
        # vLLM answered an exception no handler of its own caught (starlette's last-resort
        # handler): uvicorn then closes the connection, a kept-alive one too.
        self.close_connection = close_connection

    def event_body(self) -> bytes:
        """The error as vLLM writes it in a stream that started
        (``create_streaming_error_response``: ``json.dumps`` with its default spaces and
        ASCII escapes, unlike the compact JSON of an error response)."""
        return json.dumps(json.loads(self.body())).encode()

    def body(self) -> bytes:
        payload = {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.status,
            }
        }
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def model_not_found(model: str, base_model_name: str) -> VllmApiError:
    # Recorded: "Valid aliases" lists only the base model, never the adapters.
    return VllmApiError(
        404,
        f"The model `{model}` does not exist. Valid aliases: {base_model_name}.",
        "NotFoundError",
        "model",
    )


def bad_request(message: str, *, param: str | None = None, value: Any = None) -> VllmApiError:
    """vLLM's 400 ``BadRequestError`` for a ``VLLMValidationError(message, parameter=param,
    value=value)`` (or, without ``param``, a ``ValueError``/``TypeError``): the error's
    ``str()`` appends ``(parameter=..., value=...)``, whichever of them is not None (then
    sanitised, as every vLLM error message is: ``create_error_response``)."""
    extras = []
    if param is not None:
        extras.append(f"parameter={param}")
    if value is not None:
        extras.append(f"value={value}")
    if extras:
        message = f"{message} ({', '.join(extras)})"
    return VllmApiError(400, message, "BadRequestError", param)


def invalid_user_input(message: str) -> VllmApiError:
    return VllmApiError(400, message, "InvalidUserInput")


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldError:
    """One pydantic-style validation error."""

    kind: str  # pydantic's error type: "missing", "int_type", "json_invalid", ...
    loc: tuple[str | int, ...]
    msg: str
    input: Any
    ctx: Mapping[str, Any] | None = None


# vLLM's validation handler (serve/exception_handling/handlers/validation.py) bounds its message.
_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200
_MAX_ERROR_CHARS = 1000


def _summarise(value: Any) -> Any:
    """vLLM's size-bounded stand-in for an error's input (``_summarize_error_input``)."""
    if isinstance(value, str):
        if len(value) > _MAX_ERROR_INPUT_CHARS:
            return value[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
        return value
    if isinstance(value, bytes | bytearray):
        return f"<{type(value).__name__} of {len(value)} bytes>"
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = str(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        return f"<{type(value).__name__}>"
    if len(text) > _MAX_ERROR_INPUT_CHARS:
        return text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
    return text


def _render(err: FieldError) -> str:
    """One error as vLLM renders it (``_format_error``): ``str()`` of pydantic's error dict with
    the input summarised and ``loc`` joined with dots, bounded."""
    entry: dict[str, Any] = {
        "type": err.kind,
        "loc": ".".join(str(part) for part in err.loc),
        "msg": err.msg,
        "input": _summarise(err.input),
    }
    if err.ctx is not None:
        entry["ctx"] = dict(err.ctx)
    text = str(entry)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + "...[truncated]"
    return text


def validation_message(errors: Sequence[FieldError]) -> tuple[str, str | None]:
    """The message and ``param`` of vLLM's answer to a body that failed request validation
    (``validation_exception_handler``): at most 10 errors listed, sanitised."""
    count = len(errors)
    if not count:
        return "Validation error", None
    label = "error" if count == 1 else "errors"
    message = f"{count} validation {label}:\n"
    message += "".join(f"  {_render(err)}\n" for err in errors[:_MAX_REPORTED_ERRORS])
    if count > _MAX_REPORTED_ERRORS:
        message += f"  ...and {count - _MAX_REPORTED_ERRORS} more {label}\n"
    param = ".".join(str(part) for part in errors[0].loc)
    return sanitize_message(message.rstrip()), param  # (the gateway's answer uses it too)


def validation_error(errors: Sequence[FieldError]) -> VllmApiError:
    """The 400 ``Bad Request`` vLLM returns when the request body fails validation."""
    message, param = validation_message(errors)
    return VllmApiError(400, message, "Bad Request", param)


_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")
_TRACEBACK_LINE = re.compile(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?')
_SYSTEM_PATH = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_FILE_PATH = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def sanitize_message(message: str) -> str:
    """vLLM strips memory addresses, tracebacks and file paths from every error message
    (``serve/exception_handling/utils.py``)."""
    message = _MEMORY_ADDRESS.sub(">", message)
    message = _TRACEBACK_LINE.sub("", message)
    message = _SYSTEM_PATH.sub("<path>", message)
    message = _FILE_PATH.sub("<path>", message)
    return message.strip()


def missing(field: str, body: Mapping[str, Any]) -> FieldError:
    return FieldError(kind="missing", loc=("body", field), msg="Field required", input=body)


def json_invalid(exc: json.JSONDecodeError) -> VllmApiError:
    return validation_error(
        [
            FieldError(
                kind="json_invalid",
                loc=("body", exc.pos),
                msg="JSON decode error",
                input={},
                ctx={"error": exc.msg},
            )
        ]
    )


UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"


def check_json_media_type(content_type: str, body: bytes = b"") -> None:
    """vLLM's ``validate_json_request`` dependency on its JSON endpoints (completions, chat,
    load/unload adapter): a ``Content-Type`` header (absent: ``""``) whose media type is not
    exactly ``application/json`` (any case) is refused ahead of the body's own errors, as a
    request validation error whose one error is a string (so no ``param``). FastAPI decodes a
    non-empty body of an ``application/*json`` or ``+json`` type before the dependency runs, so
    such a body's JSON errors come first."""
    if content_type.lower().split(";", maxsplit=1)[0] == "application/json":
        return
    if body and _decoded_by_fastapi(content_type):
        try:
            json.loads(body)
        except json.JSONDecodeError as exc:
            raise json_invalid(exc) from exc
        except (ValueError, RecursionError) as exc:  # not UTF-8, too many digits, too deep
            raise unparsable_body() from exc
    raise VllmApiError(400, f"1 validation error:\n  {UNSUPPORTED_MEDIA_TYPE}", "Bad Request")


def _decoded_by_fastapi(content_type: str) -> bool:
    """Whether FastAPI 0.136 (``strict_content_type``) reads a body of this type as JSON."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class FastApiHttpError(VllmApiError):
    """An error FastAPI answers itself, in its own shape ``{"detail": message}`` (vLLM 0.32
    leaves its ``HTTPException``s to FastAPI's handler)."""

    def body(self) -> bytes:
        return json.dumps({"detail": self.message}, separators=(",", ":")).encode()


def unparsable_body() -> VllmApiError:
    """FastAPI's ``HTTPException(400)`` for a JSON body ``json.loads`` fails on other than with
    a ``JSONDecodeError`` (bytes that are no UTF-8, an integer of more than 4,300 digits,
    nesting deeper than the recursion limit): ``{"detail": "There was an error parsing the
    body"}`` on real vLLM 0.32 (``tests/e2e/test_vllm_parity.py``)."""
    return FastApiHttpError(400, "There was an error parsing the body", "Bad Request")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object, or raise vLLM's 400."""
    if not raw.strip():
        raise validation_error(
            [FieldError(kind="missing", loc=("body",), msg="Field required", input=None)]
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise json_invalid(exc) from exc
    except (ValueError, RecursionError) as exc:  # not UTF-8, too many digits, nested too deeply
        raise unparsable_body() from exc
    if not isinstance(data, dict):
        raise validation_error(
            [
                FieldError(
                    kind="model_attributes_type",
                    loc=("body",),
                    msg="Input should be a valid dictionary or object to extract fields from",
                    input=data,
                )
            ]
        )
    return data
