"""Read a gateway config file: YAML -> ``loragate.core.config.config_from_mapping``.

(``core`` may not import ``yaml``, so the file is read here; all validation is in core.) The
``routing:`` section is also built once with ``loragate.routing.build_policy`` so an unknown
policy fails at load time, naming the key.

Every problem is one line naming the file, the line and column of the key and the key, as a
workload spec's are (``gw.yaml:7:3: limits.request_timeout_s: must be a positive number of
seconds, got -1``; a missing key points at the mapping that lacks it), routing errors
included; a misspelt key is reported before anything else in its mapping, with the nearest
key as a hint. A YAML syntax error names ``file:line:column``, a file that is not UTF-8 says
so, a key written twice in one mapping (which YAML would otherwise settle silently, the last
one winning) and nesting deeper than any config needs are errors at their line. The strict
YAML reading and the rendering are the workload specs' (``loragate.workload.yaml_file``: also
YAML 1.2 booleans), so both kinds of file follow the same rules. A bad
``LORAGATE_ADMIN_TOKEN`` / ``LORAGATE_METRICS_TOKEN`` names the variable, not a line.

Adapter ranks are read from the adapters' folders where the gateway can read them
(``gateway.adapter_rank``): a ``rank:`` that disagrees with the folder's ``r`` is an error
naming the key, and adapters with neither are logged with the rank assumed (8). A rank above
the ``max_lora_rank`` of every replica (each one's ``settings.max_lora_rank`` given) is an error
naming the adapter's key: no replica could load it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

from loragate.core.config import EnvironmentVariableError, GatewayConfig, config_from_mapping
from loragate.core.errors import ConfigError
from loragate.gateway.adapter_rank import DEFAULT_RANK, RankError, RankLimits, settle_rank
from loragate.routing import build_policy
from loragate.workload.yaml_file import load_yaml_with_lines, naming_file, read_text_file

log = logging.getLogger(__name__)


def parse_config_text(text: str, *, source: str = "<config>") -> GatewayConfig:
    """Validate ``text``; any problem is one ``ConfigError`` naming ``source``, the line and
    column of the key and the key (``SpecFileError``), or the environment variable."""
    data, lines = load_yaml_with_lines(text, source)
    with naming_file(source, lines, outside=(EnvironmentVariableError,)):
        config = config_from_mapping(data)
        build_policy(config.routing.build_spec(), seed=config.routing.seed)  # validate now
        return _settle_ranks(config, data, source)


def _settle_ranks(config: GatewayConfig, data: object, source: str) -> GatewayConfig:
    """Each adapter's rank from its folder's ``adapter_config.json`` when the gateway can read
    it (``gateway.adapter_rank``): a ``rank:`` that disagrees is an error naming the key; an
    adapter with neither gets 8, said in one warning."""
    raw = data.get("adapters") if isinstance(data, Mapping) else None
    if not config.adapters or not isinstance(raw, list):
        return config
    specs, assumed = [], []
    limits = RankLimits.of(config.replicas)
    for i, (spec, item) in enumerate(zip(config.adapters, raw, strict=True)):
        given = spec.rank if isinstance(item, Mapping) and "rank" in item else None
        try:
            settled = settle_rank(spec.path, given, given_source="config")
        except RankError as exc:
            raise ConfigError(str(exc), key=f"adapters[{i}].rank") from exc
        if (problem := limits.problem(settled.rank)) is not None:
            # Named where the rank came from: the rank: given, else the folder (its r, or
            # none readable there: 8 assumed).
            if given is not None:
                raise ConfigError(f"{problem}: no replica could load it", key=f"adapters[{i}].rank")
            why = (
                "read from its adapter_config.json"
                if settled.unread is None
                else f"assumed: no rank: given, and {settled.unread}"
            )
            raise ConfigError(
                f"{problem} (the rank {why}): no replica could load it", key=f"adapters[{i}].path"
            )
        if settled.source == "default":
            assumed.append(f"{spec.name} ({settled.unread})")
        specs.append(dataclasses.replace(spec, rank=settled.rank))
    if assumed:
        log.warning(
            "%s: rank %d assumed for the adapters without a rank: whose adapter_config.json the "
            "gateway cannot read: %s",
            source, DEFAULT_RANK, "; ".join(assumed),
        )  # fmt: skip
    return dataclasses.replace(config, adapters=tuple(specs))


def load_config(path: str | Path) -> GatewayConfig:
    """Load and validate ``path``; any problem is one ``ConfigError`` naming the file, the
    line and the key (see :func:`parse_config_text`)."""
    p = Path(path)
    return parse_config_text(read_text_file(p, "config file"), source=str(p))
