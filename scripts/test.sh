#!/usr/bin/env bash
# Set up (if needed) and run every check: ruff (lint + format), then the fast suite with the end-to-end study
# (`slow`) beside the real-engine (vLLM CPU) tests.
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
# Two pytest runs at once. The vLLM engine tests in one process, where each toy model's engines start once
# (tests/conftest.py); its log is printed when it is done. Everything else (the fast suite and the end-to-end
# study, which goes first) on two pytest-xdist workers: most tests wait on subprocesses (CLI runs, Ray, servers)
# for part of their time.
engine_log="$(mktemp)"
run_pytest -m vllm -q "$@" >"$engine_log" 2>&1 &
engine_run=$!
status=0
run_pytest -m "not vllm" -n 2 -q "$@" || status=$?
engine_status=0
wait "$engine_run" || engine_status=$?
echo "---- the vLLM engine tests (pytest -m vllm) ----"
cat "$engine_log"
rm -f "$engine_log"
[ "$status" -eq 0 ] && [ "$engine_status" -eq 0 ]
