"""The sha256 of a JSON document in canonical form (sorted keys, no spaces).

What identifies a ``routing:`` section wherever it runs is this digest of its canonical form
(``loragate.routing.resolved.routing_sha256``: every parameter resolved, defaults filled in):
the gateway shows it as ``loragate_config_info{sha256}``, ``loragate simulate`` records it as
``config.routing.sha256`` in its summary. Formatting, comments, the order of keys and the
other sections of a file do not count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_sha256(doc: Mapping[str, Any]) -> str:
    """The hex sha256 of ``doc`` as canonical JSON (sorted keys, no spaces; anything JSON
    cannot represent as its ``str``)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
