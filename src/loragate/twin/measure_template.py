"""``loragate twin measure``'s servers: the user's vLLM command line as a template.

The calibration must vary the engine's LoRA settings, so the command names them as
placeholders, filled in per server: ``{port}``, ``{max_loras}``, ``{max_cpu_loras}``,
``{max_lora_rank}`` and ``{max_num_seqs}`` (all required), e.g.

    vllm serve MODEL --enable-lora --max-loras {max_loras} --max-cpu-loras {max_cpu_loras}
        --max-lora-rank {max_lora_rank} --max-num-seqs {max_num_seqs} --port {port}

The command is split like a shell would (``shlex``) and run directly, not through a shell
(environment variables: prefix it with ``env NAME=VALUE``). Literal braces, e.g. JSON values,
are left alone: only ``{name}`` with a lower-case name is a placeholder, and an unknown one is
an error. The server without LoRA (the base sweep) runs ``--vllm-base-command`` if given
(placeholders ``{port}`` and ``{max_num_seqs}``), else the same command without
``--enable-lora`` and without the options holding the LoRA placeholders.

Every server is reached on ``127.0.0.1:{port}`` and gets ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(the sweeps register their adapters through ``/v1/load_lora_adapter``) and a private TMPDIR.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loragate.core.errors import ConfigError, MeasurementError
from loragate.core.signal_handlers import signals_deferred
from loragate.twin.measure_launch import AdapterSet, MeasuredServer, ServerSettings, base_model_card
from loragate.twin.measure_server import ServerProcess, free_port, spawn_server, wait_ready

LORA_PLACEHOLDERS = ("max_loras", "max_cpu_loras", "max_lora_rank")
PLACEHOLDERS = ("port", *LORA_PLACEHOLDERS, "max_num_seqs")
BASE_PLACEHOLDERS = ("port", "max_num_seqs")
_PLACEHOLDER_RE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
# Options a server without LoRA must not get (left after taking out the LoRA placeholders).
_LORA_OPTION_PREFIXES = (
    "--enable-lora",
    "--max-lora",
    "--max-cpu-lora",
    "--lora-",
    "--fully-sharded-loras",
)


def _braced(names: Sequence[str]) -> str:
    return ", ".join("{" + n + "}" for n in names)


@dataclass(frozen=True, kw_only=True)
class CommandTemplate:
    """A server command line with placeholders (already split into arguments)."""

    args: tuple[str, ...]
    option: str  # the CLI option it came from, for error messages

    @staticmethod
    def parse(text: str, *, option: str, required: Sequence[str]) -> CommandTemplate:
        """Split ``text`` and check its placeholders: every one of ``required`` present, none
        unknown. Raises :class:`ConfigError` naming ``option``."""
        try:
            args = tuple(shlex.split(text))
        except ValueError as exc:
            raise ConfigError(f"cannot split the command ({exc})", key=option) from exc
        if not args:
            raise ConfigError("the command is empty", key=option)
        found = {m.group(1) for a in args for m in _PLACEHOLDER_RE.finditer(a)}
        unknown = sorted(found - set(required))
        if unknown:
            raise ConfigError(
                f"unknown placeholder(s) {_braced(unknown)}; the placeholders are "
                f"{_braced(required)}",
                key=option,
            )
        missing = [n for n in required if n not in found]
        if missing:
            raise ConfigError(
                f"the command lacks the placeholder(s) {_braced(missing)}: the calibration "
                f"starts servers with its own {_braced(required)}, e.g. "
                f"'--max-loras {{max_loras}}'",
                key=option,
            )
        return CommandTemplate(args=args, option=option)

    def render(self, values: Mapping[str, object]) -> list[str]:
        return [_PLACEHOLDER_RE.sub(lambda m: str(values[m.group(1)]), a) for a in self.args]

    def without_lora(self) -> CommandTemplate:
        """The same command with ``--enable-lora`` and the LoRA placeholders' options taken
        out (``--max-loras {max_loras}`` or ``--max-loras={max_loras}``)."""
        keep: list[str] = []
        for arg in self.args:
            if arg == "--enable-lora":
                continue
            names = {m.group(1) for m in _PLACEHOLDER_RE.finditer(arg)}
            if names & set(LORA_PLACEHOLDERS):
                if not arg.startswith("--") and keep and keep[-1].startswith("--"):
                    keep.pop()  # the option whose value this is
                continue
            keep.append(arg)
        left = [a for a in keep if a.startswith(_LORA_OPTION_PREFIXES)]
        if left:
            raise ConfigError(
                f"cannot derive the server without LoRA from this command: it keeps "
                f"{' '.join(left)} once --enable-lora and the LoRA placeholders are taken "
                f"out; give --vllm-base-command (placeholders {_braced(BASE_PLACEHOLDERS)})",
                key=self.option,
            )
        return CommandTemplate(args=tuple(keep), option=self.option)


def adapter_rank(folder: Path) -> int:
    """The LoRA rank ``r`` of a peft adapter folder (its ``adapter_config.json``)."""
    config = folder / "adapter_config.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder", key="--adapter")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{folder} has no adapter_config.json (a peft LoRA adapter folder)", key="--adapter"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config}: {exc}", key="--adapter") from exc
    rank = data.get("r") if isinstance(data, dict) else None
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{config} has no positive integer rank 'r'", key="--adapter")
    return rank


def adapter_set(folders: Sequence[str]) -> AdapterSet:
    """The ``--adapter`` folders by rank (absolute paths: the server reads them)."""
    if not folders:
        raise ConfigError(
            "no adapter given: the LoRA and loading sweeps need at least one peft LoRA "
            "adapter folder (repeat --adapter for more ranks)",
            key="--adapter",
        )
    out: AdapterSet = {}
    for text in folders:
        folder = Path(text).expanduser().resolve()
        out.setdefault(adapter_rank(folder), []).append(folder)
    return out


@dataclass(frozen=True, kw_only=True)
class TemplateLauncher:
    """Starts each sweep's server from the user's command template; server logs go to
    ``log_dir/<sweep>.log``."""

    command: CommandTemplate
    base_command: CommandTemplate
    log_dir: Path
    ready_timeout_s: float = 600.0

    def start(self, settings: ServerSettings, name: str) -> MeasuredServer:
        template = self.command if settings.enable_lora else self.base_command
        port = free_port()
        cmd = template.render({**asdict(settings), "port": port})
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"loragate-measure-{name}-"))
        env = dict(os.environ)
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", TMPDIR=str(tmp_dir))
        log_path = self.log_dir / f"{name}.log"
        t0 = time.monotonic()
        server: ServerProcess | None = None
        try:
            # A SIGTERM or Ctrl-C between the fork and ``server`` being set (inside Popen, which
            # waits for the exec) is acted on once it is set: the server is stopped below, not
            # left running in its session of its own.
            with signals_deferred():
                try:
                    proc = spawn_server(cmd, env=env, log_path=log_path)
                except MeasurementError:
                    os.rmdir(tmp_dir)
                    raise
                server = ServerProcess(port=port, proc=proc, log_path=log_path, tmp_dir=tmp_dir)
            wait_ready(server, ready_timeout_s=self.ready_timeout_s, t0=t0)
        except MeasurementError as exc:
            if server is None:  # the command cannot run: spawn_server's message names it
                raise
            raise MeasurementError(f"{name} server ({shlex.join(cmd)}): {exc.message}") from exc
        except BaseException:
            if server is not None:
                server.stop()
            raise
        try:
            base_model, max_model_len = base_model_card(server.base_url)
        except BaseException:
            server.stop()
            raise
        return MeasuredServer(
            settings=settings,
            process=server,
            base_model=base_model,
            max_model_len=max_model_len,
            max_num_batched_tokens=server.facts.max_num_batched_tokens,
        )
