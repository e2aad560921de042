"""``loragate loadtest --api-keys FILE``: each model's API key, for a fleet whose tenants each
hold their own adapters (one key sees only its tenant's: ``GET /v1/models`` with one key lists
its adapters alone, and a request for another tenant's adapter is refused).

The file maps a model (an adapter's name, or the base model) to the key its requests are sent
with (``Authorization: Bearer KEY``), in one of two forms, told apart by the file's suffix:

* ``.csv``: one ``model,key`` line per model; blank lines and lines starting with ``#`` are
  skipped, and a first line ``model,api_key`` (or ``model,key``) is a header;
* anything else: a YAML (or JSON) mapping, ``{model: key, ...}``, read by the strict reader
  (a model written twice is an error at its line).

Every problem is one ``ConfigError`` naming the file and the line (and column, in YAML): a
model written twice, an empty model or key, a key with whitespace or a control character (no
HTTP header could carry it), a file with no model.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

from loragate.core.errors import ConfigError
from loragate.workload.yaml_file import load_yaml_with_lines, naming_file, read_text_file

WHAT = "--api-keys file"
_HEADERS = ({"model", "api_key"}, {"model", "key"})


def read_api_keys(path: Path) -> dict[str, str]:
    """Model -> API key, from ``path`` (see the module docstring), in the file's order."""
    text = read_text_file(path, WHAT)
    source = str(path)
    if path.suffix.lower() == ".csv":
        keys = _from_csv(text, source)
    else:
        data, lines = load_yaml_with_lines(text, source)
        with naming_file(source, lines):
            keys = _from_mapping(data)
    if not keys:
        raise ConfigError(f"{source}: no model in the {WHAT} (expected model -> key)")
    return keys


def _from_mapping(data: object) -> dict[str, str]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of model -> key, got {type(data).__name__}")
    out: dict[str, str] = {}
    for model, key in data.items():
        name = str(model)
        _check(name, key, where=name)
        out[name] = str(key)
    return out


def _from_csv(text: str, source: str) -> dict[str, str]:
    out: dict[str, str] = {}
    first: dict[str, int] = {}
    rows = 0
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        rows += 1
        if rows == 1 and {c.lower() for c in cells} in _HEADERS:
            continue  # a header
        at = f"{source}:{line_no}"
        if len(cells) != 2:
            raise ConfigError(f"{at}: expected 'model,key', got {len(cells)} field(s)")
        model, key = cells
        try:
            _check(model, key, where=None)
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from exc
        if model in first:
            raise ConfigError(f"{at}: model {model!r} is written twice (line {first[model]})")
        first[model] = line_no
        out[model] = key
    return out


def _check(model: str, key: object, *, where: str | None) -> None:
    """Refuse an empty model, and a key that is not a non-empty string an HTTP header can
    carry. ``where``: the key of the mapping (None: said by the caller)."""
    if not model.strip():
        raise ConfigError("an empty model name", key=where)
    if not isinstance(key, str) or not key:
        shown = "nothing" if key is None or key == "" else type(key).__name__
        raise ConfigError(f"the key of {model!r} must be a non-empty string, got {shown}",
                          key=where)  # fmt: skip
    bad = next((c for c in key if c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ConfigError(
            f"the key of {model!r} holds {bad!r}: no Authorization header can carry it",
            key=where,
        )
