"""A SIGTERM (or Ctrl-C) that comes while ``twin measure`` starts a server, between the fork and
Popen handing back the child (Popen waits for the exec), stops that server too.

Before: the ``SystemExit`` of the SIGTERM handler left ``spawn_server`` before its Popen was
returned, so no cleanup knew of the child, and the server (in a session of its own) outlived
the measure: ``test_measure_cli``'s SIGTERM-during-start-up test found it running about 1 run
in 3 of the new tests (3 runs each). Now ``TemplateLauncher.start`` defers the signals for
that step (``core.signal_handlers.signals_deferred``) and stops the server it then has.

The signal is raised in the process itself right after the real fork (the window made
deterministic); the server is a real child process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loragate.twin import measure_template
from loragate.twin.measure_launch import ServerSettings
from loragate.twin.measure_template import (
    BASE_PLACEHOLDERS,
    PLACEHOLDERS,
    CommandTemplate,
    TemplateLauncher,
)

# A server that never gets ready and stops on SIGTERM (Python's default action).
SLEEPER = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(120)'"


def _launcher(tmp_path: Path) -> TemplateLauncher:
    lora = " --port {port} --max-loras {max_loras} --max-cpu-loras {max_cpu_loras}"
    lora += " --max-lora-rank {max_lora_rank} --max-num-seqs {max_num_seqs}"
    return TemplateLauncher(
        command=CommandTemplate.parse(
            SLEEPER + lora, option="--vllm-command", required=PLACEHOLDERS
        ),
        base_command=CommandTemplate.parse(
            SLEEPER + " --port {port} --max-num-seqs {max_num_seqs}",
            option="--vllm-base-command",
            required=BASE_PLACEHOLDERS,
        ),
        log_dir=tmp_path,
        ready_timeout_s=60.0,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_server_is_spawned_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = measure_template.spawn_server

    def spawn_then_signal(cmd: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_spawn(cmd, **kwargs)
        spawned.append(proc)
        signal.raise_signal(sig)  # as if it came while Popen waited for the exec
        return proc

    monkeypatch.setattr(measure_template, "spawn_server", spawn_then_signal)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # twin measure's
    left_running = []
    try:
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            _launcher(tmp_path).start(ServerSettings(), "lora")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in spawned:
            if proc.poll() is None:
                left_running.append(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert len(spawned) == 1
    assert left_running == []
