#!/usr/bin/env bash
# Set up (if needed), then run the main job on the embedded toy world:
# gen (real vLLM CPU engine) -> validate -> info -> replay (baselines, STEER sweep) -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
out="${TRACE_DEMO_DIR:-runs/toy}"
limit="${TRACE_DEMO_LIMIT:-200}"

trace gen --model toy-small --large toy-large --dataset toy --limit "$limit" --out "$out"
trace validate "$out"
trace info "$out"
mkdir -p "$out/results"
for router in small-only large-only oracle; do
  trace replay "$out" --router "$router" --out "$out/results/$router.parquet"
done
trace replay "$out" --router steer --param mode=switch --sweep tau=0:1:0.05 --out "$out/results/steer.parquet"
trace report "$out" "$out/results/"*.parquet --out "$out/report"
echo "trace: $out   report: $out/report/index.html"
