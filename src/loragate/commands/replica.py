"""``loragate replica``: run one simulated vLLM 0.32 replica (flags mirror vLLM's)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from loragate.core.errors import ConfigError
from loragate.twin.replica_config import DEFAULT_MODEL, ReplicaConfig, parse_lora_module

HELP = "Run a simulated vLLM 0.32 replica (the twin engine in wall-clock time)."
READY_PREFIX = "loragate replica: serving"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    v = parser.add_argument_group("vLLM flags")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    v.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    v.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="model path/name: the base card's root and the resolver's base_model_name_or_path "
        "(default: %(default)s)",
    )
    v.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name clients use for the base model (first one; default: --model)",
    )
    v.add_argument(
        "--enable-lora",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="serve LoRA adapters (without it, every adapter load is refused with vLLM's 500 "
        "'LoRA is not enabled')",
    )
    v.add_argument(
        "--runtime-lora-updating",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve /v1/load_lora_adapter, /v1/unload_lora_adapter and /adapters, as vLLM does "
        "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (--no-runtime-lora-updating: they are 404 "
        '{"detail":"Not Found"}, as without it; default: on)',
    )
    v.add_argument(
        "--max-loras",
        type=int,
        default=1,
        help="adapters per batch / GPU slots (default: %(default)s)",
    )
    v.add_argument("--max-cpu-loras", type=int, default=None, help="CPU cache (default: max-loras)")
    v.add_argument("--max-lora-rank", type=int, default=16, help="default: %(default)s")
    v.add_argument("--max-num-seqs", type=int, default=256, help="default: %(default)s")
    v.add_argument("--max-num-batched-tokens", type=int, default=2048, help="default: %(default)s")
    v.add_argument("--max-model-len", type=int, default=4096, help="default: %(default)s")
    v.add_argument("--block-size", type=int, default=16, help="default: %(default)s")
    v.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="KV capacity in blocks (default: the profile's memory model)",
    )
    v.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="adapters registered at start-up (name=path or vLLM's JSON form); repeatable",
    )
    v.add_argument(
        "--enable-server-load-tracking", action=argparse.BooleanOptionalAction, default=False
    )
    v.add_argument(
        "--shutdown-timeout",
        type=float,
        default=0.0,
        help="seconds a SIGTERM lets requests in flight finish (listening, /health 200, new "
        "requests refused with vLLM's 500) before the engine stops; 0 aborts them at once "
        "(default: %(default)s)",
    )
    t = parser.add_argument_group("twin flags")
    t.add_argument(
        "--simulated",
        action="store_true",
        help="the replica is the digital twin (the only kind `loragate replica` runs; the flag "
        "is accepted as the design documents spell the command)",
    )
    t.add_argument(
        "--profile",
        default="fast",
        help="performance profile name (loragate twin profiles) or YAML path "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--resolver-dir",
        default=None,
        metavar="DIR",
        help="vLLM filesystem resolver: auto-register DIR/<model> on first request",
    )
    t.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic outputs (default: %(default)s)"
    )
    t.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="speed factor (2.0 = 2x faster; default: %(default)s)",
    )
    t.add_argument(
        "--mean-output-tokens",
        type=float,
        default=128.0,
        help="mean sampled EOS position when ignore_eos is false (default: %(default)s)",
    )
    t.add_argument(
        "--add-bos",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="count a BOS token in completion prompts, as a Llama tokenizer adds one (default: "
        "no, as the bundled tiny-llama's tokenizer)",
    )


def config_from_args(args: argparse.Namespace) -> ReplicaConfig:
    served = args.served_model_name
    return ReplicaConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=served[0] if served else None,
        enable_lora=args.enable_lora,
        runtime_lora_updating=args.runtime_lora_updating,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        lora_modules=tuple(parse_lora_module(m) for m in args.lora_modules),
        enable_server_load_tracking=args.enable_server_load_tracking,
        shutdown_timeout=args.shutdown_timeout,
        profile=args.profile,
        resolver_dir=args.resolver_dir,
        seed=args.seed,
        time_scale=args.time_scale,
        mean_output_tokens=args.mean_output_tokens,
        add_bos=args.add_bos,
    )


async def serve(config: ReplicaConfig) -> None:
    """Serve until SIGINT/SIGTERM; prints one ready line with the URL on stdout."""
    from loragate.twin.server import run_replica

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_replica(config) as replica:
        print(f"{READY_PREFIX} {config.base_model_name} on {replica.url}", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        import uvloop

        from loragate.core.signal_handlers import signal_handlers_kept

        # uvloop leaves its own handlers behind after the loop closed (core.signal_handlers).
        with signal_handlers_kept():
            uvloop.run(serve(config))
    except ConfigError as exc:
        print(f"loragate replica: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"loragate replica: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0
