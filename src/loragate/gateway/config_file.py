"""Read a gateway config file: YAML -> ``loragate.core.config.config_from_mapping``.

(``core`` may not import ``yaml``, so the file is read here; all validation is in core.) The
``routing:`` section is also built once with ``loragate.routing.build_policy`` so an unknown
policy fails at load time, naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from loragate.core.config import GatewayConfig, config_from_mapping
from loragate.core.errors import ConfigError
from loragate.routing import build_policy


def parse_config_text(text: str, *, source: str = "<config>") -> GatewayConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
    config = config_from_mapping(data)
    build_policy(config.routing.build_spec(), seed=config.routing.seed)  # validate now
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate ``path``; any problem is one ``ConfigError`` naming the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    return parse_config_text(text, source=str(p))
