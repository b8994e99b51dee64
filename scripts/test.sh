#!/usr/bin/env bash
# Set up (if needed) and run every check: ruff (lint + format), the fast suite, then the real-engine (vLLM CPU)
# tests. The fast suite runs first so that a plain failure shows in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
ruff check .
ruff format --check .

run_pytest() {
  set +e
  python -m pytest "$@"
  local status=$?
  set -e
  # pytest exits 5 when nothing was collected: that is a broken suite, not a pass.
  [ "$status" -eq 5 ] && echo "pytest collected no tests: $*" >&2
  return "$status"
}
run_pytest -m "not vllm and not slow" -q "$@"
run_pytest -m "vllm or slow" -q "$@"
