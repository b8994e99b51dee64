#!/usr/bin/env bash
# Set up (if needed) and run every test: the fast suite and the real-engine (vLLM CPU) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
set +e
python -m pytest -m "vllm or not vllm" -q "$@"
status=$?
set -e
# pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
[ "$status" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$status"
