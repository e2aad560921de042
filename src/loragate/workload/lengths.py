"""Prompt/output length distributions: loading empirical values and vectorised sampling."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from loragate.core.errors import ConfigError
from loragate.workload.spec import (
    EmpiricalLength,
    FixedLength,
    LengthDist,
    LengthsSpec,
    LognormalLength,
    UniformLength,
)

IntArray = npt.NDArray[np.int64]

MAX_VALUES = 5_000_000


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return io.TextIOWrapper(path.open("rb"), encoding="utf-8")


def _stem_suffix(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def load_length_values(path: Path, column: str | None, *, key: str) -> tuple[int, ...]:
    """Token counts from a file: ``.csv`` (needs ``column``), ``.jsonl`` (needs ``column`` = the
    field name), anything else one number per line. ``.gz`` is decompressed. Values below 1 are
    raised to 1 (an engine cannot produce 0 tokens). A bad value is an error naming its line."""
    kind = _stem_suffix(path)
    raw: list[float] = []
    line = 0

    def number(value: object, line: int) -> float:
        try:
            return float(value)  # type: ignore[arg-type]  # str, int, float or bad JSON
        except (TypeError, ValueError):
            shown = repr(value if not isinstance(value, str) else value.strip())
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ConfigError(f"{path} line {line}: not a number: {shown}", key=key) from None

    try:
        with _open_text(path) as fh:
            if kind == "csv":
                if column is None:
                    raise ConfigError("a CSV file needs `column`", key=key)
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or column not in reader.fieldnames:
                    raise ConfigError(
                        f"column {column!r} not in {path.name} (has {reader.fieldnames})", key=key
                    )
                for row in reader:
                    raw.append(number(row[column], reader.line_num))
            elif kind == "jsonl":
                if column is None:
                    raise ConfigError("a JSONL file needs `column` (the field name)", key=key)
                for line, text in enumerate(fh, 1):
                    if text.strip():
                        record = json.loads(text)
                        if not isinstance(record, dict) or column not in record:
                            raise ConfigError(
                                f"{path} line {line} has no field {column!r}", key=key
                            )
                        raw.append(number(record[column], line))
            else:
                for line, text in enumerate(fh, 1):
                    if text.strip():
                        raw.append(number(text, line))
    except ConfigError:
        raise
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file (nor gzipped text)", key=key) from None
    except ValueError as exc:  # JSON
        raise ConfigError(f"{path} line {line}: not JSON ({exc})", key=key) from None
    except (OSError, EOFError, csv.Error) as exc:  # includes a .gz file that is not gzip
        raise ConfigError(f"cannot read lengths from {path}: {exc}", key=key) from exc
    if len(raw) > MAX_VALUES:
        raise ConfigError(f"too many values ({len(raw)} > {MAX_VALUES})", key=key)
    return tuple(max(1, round(v)) for v in raw if math.isfinite(v))


class LengthSampler:
    """Draws integer lengths >= 1 from one distribution (empirical tables prepared once)."""

    __slots__ = ("_cdf", "_dist", "_values")

    def __init__(self, dist: LengthDist) -> None:
        self._dist = dist
        self._values: IntArray | None = None
        self._cdf: npt.NDArray[np.float64] | None = None
        if isinstance(dist, EmpiricalLength):
            self._values = np.asarray(dist.values, dtype=np.int64)
            if dist.weights:
                w = np.asarray(dist.weights, dtype=np.float64)
                self._cdf = np.cumsum(w / w.sum())

    def sample(self, rng: np.random.Generator, n: int) -> IntArray:
        dist = self._dist
        if isinstance(dist, FixedLength):
            return np.full(n, dist.value, dtype=np.int64)
        if isinstance(dist, UniformLength):
            return rng.integers(dist.min, dist.max + 1, size=n, dtype=np.int64)
        if isinstance(dist, LognormalLength):
            mu = math.log(dist.mean) - dist.sigma**2 / 2.0
            x = rng.lognormal(mu, dist.sigma, size=n)
            return np.clip(np.rint(x), dist.min, dist.max).astype(np.int64)
        assert self._values is not None
        if self._cdf is None:
            return self._values[rng.integers(0, len(self._values), size=n)]
        idx = np.searchsorted(self._cdf, rng.random(n), side="right")
        return self._values[np.minimum(idx, len(self._values) - 1)]


class PairSampler:
    """Prompt and output lengths (independent), clipped to ``max_total_tokens`` if set."""

    __slots__ = ("_cap", "_output", "_prompt")

    def __init__(self, spec: LengthsSpec) -> None:
        self._prompt = LengthSampler(spec.prompt)
        self._output = LengthSampler(spec.output)
        self._cap = spec.max_total_tokens

    def sample(self, rng: np.random.Generator, n: int) -> tuple[IntArray, IntArray]:
        prompt = self._prompt.sample(rng, n)
        output = self._output.sample(rng, n)
        if self._cap is not None:
            prompt = np.minimum(prompt, self._cap - 1)
            output = np.minimum(output, self._cap - prompt)
        return prompt, output


def mean_length(dist: LengthDist) -> float:
    """Expected value (before clipping for lognormal) — used for offered-load estimates."""
    if isinstance(dist, FixedLength):
        return float(dist.value)
    if isinstance(dist, UniformLength):
        return (dist.min + dist.max) / 2.0
    if isinstance(dist, LognormalLength):
        return dist.mean
    if dist.weights:
        w = np.asarray(dist.weights, dtype=np.float64)
        return float(np.dot(np.asarray(dist.values, dtype=np.float64), w / w.sum()))
    return float(np.mean(np.asarray(dist.values, dtype=np.float64)))
