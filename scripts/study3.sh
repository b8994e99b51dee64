#!/usr/bin/env bash
# The three-model study on the toy world, on a CPU: toy-small -> toy-medium -> toy-large as roles m0, m1, m2.
# gen (real vLLM CPU engine, the 3-model comb: each model's chain plus every larger model's completion from
# each of its nodes; then closure over data/toy/routers3.toml: the m2 steps chained STEER needs from nodes of
# m1's completions) -> verifier scores -> validate -> info -> each model alone, the oracle, the cascade over
# all four chains (m0→m1, m0→m2, m1→m2, m0→m1→m2), STEER (along m0→m1→m2, and m0→m1, m0→m2, m1→m2),
# the CMDP policy (K actions over m0, m1, m2; and m0→m2 alone) -> report with the cascade seed's table.
# Rerunning it into the same TRACE_STUDY3_DIR resumes gen and score and replaces results (--force).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
out="${TRACE_STUDY3_DIR:-runs/toy3}"
limit="${TRACE_STUDY3_LIMIT:-200}"
results="$out/results"

trace gen --models toy-small,toy-medium,toy-large --dataset toy --limit "$limit" --hidden-layers -1 \
  --expand closure --routers data/toy/routers3.toml --out "$out"
trace score "$out" --scorer verifier
trace validate "$out"
trace info "$out"

trace train policy "$out" --alpha 0.1 --steps "${TRACE_STUDY3_POLICY_STEPS:-1000}" --seed 0 --escalate replace \
  --out "$out/policy-replace.pt" --force
trace train policy "$out" --alpha 0.1 --steps "${TRACE_STUDY3_POLICY_STEPS:-1000}" --seed 0 --escalate replace \
  --models m0,m2 --out "$out/policy-m0-m2-replace.pt" --force

mkdir -p "$results"
for router in small-only large-only oracle; do
  trace replay "$out" --split all --router "$router" --out "$results/$router.parquet" --force
done
trace replay "$out" --split all --router only --param model=m1 --out "$results/only-m1.parquet" --force
for chain in m0,m1 m0,m2 m1,m2 m0,m1,m2; do
  trace replay "$out" --split all --router cascade --param models="$chain" --param p_true=final_min \
    --sweep t_true=0:1:0.1 --sweep t_ik=0:0.5:0.1 --out "$results/cascade-${chain//,/-}.parquet" --force
done
trace replay "$out" --split all --router steer --param mode=switch --sweep tau=0:1:0.1 \
  --out "$results/steer-m0-m1-m2.parquet" --force
trace replay "$out" --split all --router steer --param mode=switch --param target=m1 --sweep tau=0:1:0.1 \
  --out "$results/steer-m0-m1.parquet" --force
trace replay "$out" --split all --router steer --param mode=switch --param target=m2 --sweep tau=0:1:0.1 \
  --out "$results/steer-m0-m2.parquet" --force
trace replay "$out" --split all --router steer --param mode=switch --param draft=m1 --sweep tau=0:1:0.1 \
  --out "$results/steer-m1-m2.parquet" --force
trace replay "$out" --split all --router policy --param path="$out/policy-replace.pt" --param escalate=replace \
  --out "$results/policy-replace.parquet" --force
trace replay "$out" --split all --router policy --param path="$out/policy-m0-m2-replace.pt" \
  --param escalate=replace --out "$results/policy-m0-m2-replace.parquet" --force

trace report "$out" "$results/"*.parquet --out "$out/report" --table cmdp --table cascade
echo "trace: $out   report: $out/report/index.html"
