#!/usr/bin/env bash
# Set up (if needed), then run the whole study on the embedded toy world, on a CPU:
# gen (real vLLM CPU engine; comb + closure over data/toy/routers.toml, which scores the PRM and the judge
# on the way) -> verifier scores -> validate -> info -> train (policy, STEER mixtures)
# -> replay every router with its sweep -> report.
# Rerunning it into the same TRACE_DEMO_DIR resumes gen and score (nothing left to do), and replaces the
# trained files and results (--force) and the report (trace report updates its own earlier report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
out="${TRACE_DEMO_DIR:-runs/toy}"
limit="${TRACE_DEMO_LIMIT:-200}"
results="$out/results"

trace gen --model toy-small --large toy-large --dataset toy --limit "$limit" --hidden-layers -1 \
  --expand closure --routers data/toy/routers.toml --out "$out"
trace score "$out" --scorer verifier
trace validate "$out"
trace info "$out"

trace train policy "$out" --alpha 0.1 --steps "${TRACE_DEMO_POLICY_STEPS:-1000}" --seed 0 --out "$out/policy.pt" --force
trace train policy "$out" --alpha 0.1 --steps "${TRACE_DEMO_POLICY_STEPS:-1000}" --seed 0 --escalate replace \
  --out "$out/policy-replace.pt" --force
trace train steer "$out" --out "$out/steer.json" --force

mkdir -p "$results"
for router in small-only large-only oracle; do
  trace replay "$out" --split all --router "$router" --out "$results/$router.parquet" --force
done
trace replay "$out" --split all --router random --sweep p=0:1:0.1 --out "$results/random.parquet" --force
trace replay "$out" --split all --router steer --param mode=switch --param gmms="$out/steer.json" --sweep tau=0:1:0.1 \
  --out "$results/steer-switch.parquet" --force
trace replay "$out" --split all --router steer --param mode=step --param gmms="$out/steer.json" --sweep tau=0:1:0.1 \
  --out "$results/steer-step.parquet" --force
trace replay "$out" --split all --router rsd --sweep tau=0:1:0.1 --out "$results/rsd.parquet" --force
trace replay "$out" --split all --router specreason --sweep tau=0:9:1 --out "$results/specreason.parquet" --force
trace replay "$out" --split all --router cascade --param p_true=final_min --sweep t_true=0:1:0.1 --sweep t_ik=0:0.5:0.1 \
  --out "$results/cascade.parquet" --force
trace replay "$out" --split all --router policy --param path="$out/policy.pt" --out "$results/policy.parquet" --force
# the ablation: the step that triggered escalation is discarded and rewritten by the large model
trace replay "$out" --split all --router policy --param path="$out/policy-replace.pt" --param escalate=replace \
  --out "$results/policy-replace.parquet" --force
trace replay "$out" --split all --router steer --param mode=switch --param escalate=replace --param gmms="$out/steer.json" \
  --sweep tau=0:1:0.1 --out "$results/steer-switch-replace.parquet" --force

trace report "$out" "$results/"*.parquet --out "$out/report" \
  --policy-log "$out/policy.log.parquet" --steer-gmm "$out/steer.json" --table cmdp --table cascade
echo "trace: $out   report: $out/report/index.html"
