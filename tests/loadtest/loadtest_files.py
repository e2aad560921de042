"""What the ``loragate loadtest`` tests share: the small spec the runs against fake OpenAI
servers use, a spec written where a run reads it, and a run's JSON summary read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Two adapters, half the requests for the base model, 40 req/s for 3 s, short prompts.
FAKE_SERVER_SPEC = """\
name: tiny
seed: 5
duration_s: 3
adapters: {count: 2, base_fraction: 0.5}
arrivals: {process: poisson, rate_rps: 40}
lengths: {prompt: 4, output: {kind: uniform, min: 2, max: 8}}
"""


def write_spec(tmp_path: Path, text: str) -> Path:
    """``text`` as ``tmp_path/tiny.yaml``."""
    path = tmp_path / "tiny.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def summary_of(tmp_path: Path) -> dict[str, Any]:
    """The summary a run wrote with ``--json tmp_path/summary.json``."""
    doc: dict[str, Any] = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    return doc
