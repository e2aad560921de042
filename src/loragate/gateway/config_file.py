"""Read a gateway config file: YAML -> ``loragate.core.config.config_from_mapping``.

(``core`` may not import ``yaml``, so the file is read here; all validation is in core.) The
``routing:`` section is also built once with ``loragate.routing.build_policy`` so an unknown
policy fails at load time, naming the key.

Problems in the file itself are one line too: a YAML syntax error names ``file:line:column``,
a file that is not UTF-8 says so, and a key written twice in one mapping (which YAML would
otherwise settle silently, the last one winning) is an error naming the key. The strict YAML
reading is the workload specs' (``loragate.workload.yaml_file``: also YAML 1.2 booleans), so
both kinds of file follow the same rules.
"""

from __future__ import annotations

from pathlib import Path

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.routing import build_policy
from loragate.workload.yaml_file import load_yaml_text, read_text_file


def parse_config_text(text: str, *, source: str = "<config>") -> GatewayConfig:
    data = load_yaml_text(text, source)
    config = config_from_mapping(data)
    build_policy(config.routing.build_spec(), seed=config.routing.seed)  # validate now
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate ``path``; any problem is one ``ConfigError`` naming the key."""
    p = Path(path)
    return parse_config_text(read_text_file(p, "config file"), source=str(p))
