"""vLLM 0.32's error responses: ``{"error": {"message", "type", "param", "code"}}``.

The message texts and ``type`` strings are the ones recorded in
``shared/design/vllm-0.32/transcript_*.md``; request-body validation errors imitate the
FastAPI/pydantic rendering vLLM 0.32 uses (``N validation error(s):`` then one dict per error,
``loc`` joined with dots and container inputs summarised as ``'<dict of N items>'``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class VllmApiError(Exception):
    """An error the simulated replica answers with, in vLLM's JSON shape."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

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


def bad_request(message: str, param: str | None = None) -> VllmApiError:
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
    ctx: Mapping[str, str] | None = None


def _summarise(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"'<dict of {len(value)} items>'"
    if isinstance(value, list | tuple):
        return f"'<list of {len(value)} items>'"
    return repr(value)


def _render(err: FieldError) -> str:
    loc = ".".join(str(part) for part in err.loc)
    text = (
        f"{{'type': '{err.kind}', 'loc': '{loc}', 'msg': '{err.msg}', "
        f"'input': {_summarise(err.input)}"
    )
    if err.ctx:
        text += ", 'ctx': {" + ", ".join(f"'{k}': {v!r}" for k, v in err.ctx.items()) + "}"
    return text + "}"


def validation_error(errors: Sequence[FieldError]) -> VllmApiError:
    """The 400 ``Bad Request`` vLLM returns when the request body fails validation."""
    count = len(errors)
    noun = "validation error" if count == 1 else "validation errors"
    lines = [f"{count} {noun}:"] + [f"  {_render(e)}" for e in errors]
    param = ".".join(str(p) for p in errors[0].loc) if errors else None
    return VllmApiError(400, "\n".join(lines), "Bad Request", param)


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


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object, or raise vLLM's 400."""
    if not raw.strip():
        raise validation_error(
            [FieldError(kind="missing", loc=("body",), msg="Field required", input=None)]
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise json_invalid(exc) from exc
        raise validation_error(
            [FieldError(kind="json_invalid", loc=("body", 0), msg="JSON decode error", input={})]
        ) from exc
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
