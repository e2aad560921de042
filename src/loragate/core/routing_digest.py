"""The sha256 that identifies a ``routing:`` section wherever it runs.

The gateway shows it as ``loragate_config_info{sha256}``; ``loragate simulate`` records it as
``config.routing.sha256`` in its summary. Equal digests mean the same policy with the same
parameters: the digest is of the policy spec and seed as canonical JSON (sorted keys, no
spaces), so formatting, comments and the other sections of a file do not count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def routing_sha256(spec: str | Mapping[str, Any], seed: int = 0) -> str:
    """The digest of a routing section whose policy spec (a name or a mapping, as
    ``loragate.routing.build_policy`` takes it) is ``spec`` and whose ``seed`` is ``seed``."""
    doc = {"policy": spec, "seed": seed}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
