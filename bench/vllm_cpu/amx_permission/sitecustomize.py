"""Put on ``PYTHONPATH`` of a real vLLM CPU replica (``replica.py``): every Python process of the
server (API server, EngineCore, Worker) asks Linux for the AMX tile-data permission at start-up.

vLLM 0.32's CPU attention uses AMX for bf16 (``v1/attention/backends/cpu_attn.py``
``_get_attn_isa``: ``torch.cpu._is_amx_tile_supported()``) but nothing in the Worker asks the
kernel for AMX state first (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, Linux
>= 5.16), so on such a kernel the first forward pass dies with SIGILL: "Worker proc VllmWorker-0
died unexpectedly (exit code: -4)", then a 500 EngineDeadError for the request and the server
gone (seen on 2026-11-28 with kernel 6.18 on a Sapphire Rapids VM). Asking is harmless where AMX
is absent or already permitted.
"""

import platform
import sys

if sys.platform == "linux" and platform.machine() == "x86_64":
    try:
        import ctypes

        _ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18
        ctypes.CDLL(None, use_errno=True).syscall(
            _ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, ctypes.c_ulong(_XFEATURE_XTILEDATA)
        )
    except Exception:  # no libc to call: nothing to ask for
        pass
