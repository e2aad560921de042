"""``loragate`` console script: one subcommand per module in ``loragate.commands``.

Each command module defines ``HELP: str``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported lazily so ``loragate --help`` stays fast and a command's heavy
dependencies load only when it runs.

Output into a pipe closed early (``loragate twin validate --json | head``) ends the command
quietly with exit status 141, as a Unix tool killed by SIGPIPE, not with a traceback.
Ctrl-C while the command's modules are still being imported (seconds on a busy host) ends it
with one line and exit status 130, as Ctrl-C later in the run does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# name -> module under loragate.commands
COMMANDS: dict[str, str] = {
    "replica": "replica",
    "serve": "serve",
    "demo": "demo",
    "twin": "twin",
    "simulate": "simulate",
    "loadtest": "loadtest",
    "policies": "policies",
}


def _load(module: str) -> ModuleType:
    return importlib.import_module(f"loragate.commands.{module}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of the command ``only`` alone (the others' modules, and
    what they import, are then not loaded: ``loragate loadtest`` does not import the simulator
    and the gateway, ~0.8 s)."""
    parser = argparse.ArgumentParser(
        prog="loragate",
        description="Adapter-aware load-balancing gateway for multi-tenant LoRA serving on vLLM.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = _load(module_name)
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != f"loragate.commands.{module_name}":
                raise
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    from loragate import __version__

    return f"loragate {__version__}"


# The shell's status of a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141
# The status of a command interrupted by Ctrl-C (128 + SIGINT), as the commands' own.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    # A command named first is all that is parsed: only its module is imported.
    only = args_in[0] if args_in and args_in[0] in COMMANDS else None
    try:
        parser = build_parser(only)  # imports the command's modules
        args = parser.parse_args(args_in)
    except KeyboardInterrupt:  # Ctrl-C before the command runs: no traceback of the imports
        print(f"loragate{f' {only}' if only else ''}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    run = args._run
    try:
        code = run(args)
        sys.stdout.flush()  # buffered output meets a closed pipe here, if not before
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return int(code) if code is not None else 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still
    buffered does not fail again on the closed pipe (the recipe in Python's ``signal`` docs)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
