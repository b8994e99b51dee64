#!/usr/bin/env bash
# Set up (if needed), then run the whole study on the embedded toy world, on a CPU, as a paper would:
# fit on one trace, pick operating points on calibration rows, report on another trace.
#   train trace: the toy world's train split, divided by hash into train (fitting) and calibration (picking)
#   test trace:  the toy world's test split, every row reported
# gen (real vLLM CPU engine; comb, then closure over data/toy/routers.toml with STEER's step mode reading the
# mixtures fitted on the train split, scoring the PRM and the judge on the way) -> verifier scores -> validate ->
# info -> train (policy, STEER mixtures) on the train split -> replay every router on the calibration split and
# on the test trace -> report on the test trace, operating points picked on the calibration results.
# Rerunning it into the same TRACE_DEMO_DIR resumes gen and score (nothing left to do), and replaces the
# trained files and results (--force) and the report (trace report updates its own earlier report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}"
out="${TRACE_DEMO_DIR:-runs/toy}"
train="$out/train"                         # toy train split: 240 problems, 115 train + 125 calibration
test="$out/test"                           # toy test split: 200 problems, all reported
train_limit="${TRACE_DEMO_TRAIN_LIMIT:-240}"
test_limit="${TRACE_DEMO_LIMIT:-200}"
halves=(--split-fractions 0.5,0.5,0)       # the train trace's problems: half fit, half calibrate, none test
results="$out/results"                     # replayed on the test trace (reported)
calibration="$out/results-calibration"     # replayed on the train trace's calibration split (picked on)
gen=(--model toy-small --large toy-large --dataset toy --hidden-layers -1)
mkdir -p "$out" "$results" "$calibration"

# the train trace's comb, and STEER's mixtures fitted on its train split: closure then grows the steps STEER
# needs with these mixtures (on both traces; STEER never fits on the test trace), so every replay below has its
# steps cached
trace gen "${gen[@]}" --split train --limit "$train_limit" --expand comb --out "$train"
trace train steer "$train" "${halves[@]}" --out "$out/steer.json" --force
sed "s|params = {mode = \"\([a-z]*\)\"|params = {mode = \"\1\", gmms = \"$out/steer.json\"|" data/toy/routers.toml \
  > "$out/routers.toml"
for trace in "$train" "$test"; do
  split=$([ "$trace" = "$train" ] && echo train || echo test)
  limit=$([ "$trace" = "$train" ] && echo "$train_limit" || echo "$test_limit")
  trace gen "${gen[@]}" --split "$split" --limit "$limit" --expand closure --routers "$out/routers.toml" --out "$trace"
  trace score "$trace" --scorer verifier
  trace validate "$trace"
done
trace info "$test"

steps="${TRACE_DEMO_POLICY_STEPS:-1000}"
trace train policy "$train" "${halves[@]}" --alpha 0.1 --steps "$steps" --seed 0 --out "$out/policy.pt" --force
trace train policy "$train" "${halves[@]}" --alpha 0.1 --steps "$steps" --seed 0 --escalate replace \
  --out "$out/policy-replace.pt" --force

# each router twice, the same configurations: on the calibration split of the train trace (fitted on its train
# split) and on every problem of the test trace (fitted on the train trace's train split: fitted files, --fit-on)
replay() {  # NAME ARGS...: results/NAME.parquet and results-calibration/NAME.parquet
  local name="$1"
  shift
  trace replay "$train" "${halves[@]}" --split calibration "$@" --out "$calibration/$name.parquet" --force
  trace replay "$test" --split all "$@" --out "$results/$name.parquet" --force
}
for router in small-only large-only oracle; do
  trace replay "$test" --split all --router "$router" --out "$results/$router.parquet" --force
done
replay random --router random --sweep p=0:1:0.1
replay steer-switch --router steer --param mode=switch --param gmms="$out/steer.json" --sweep tau=0:1:0.1
replay steer-step --router steer --param mode=step --param gmms="$out/steer.json" --sweep tau=0:1:0.1
replay rsd --router rsd --sweep tau=0:1:0.1
replay specreason --router specreason --sweep tau=0:9:1
trace replay "$train" "${halves[@]}" --split calibration --router cascade --param p_true=final_min \
  --sweep t_true=0:1:0.1 --sweep t_ik=0:0.5:0.1 --out "$calibration/cascade.parquet" --force
trace replay "$test" --split all --router cascade --param p_true=final_min --fit-on "$train" "${halves[@]}" \
  --sweep t_true=0:1:0.1 --sweep t_ik=0:0.5:0.1 --out "$results/cascade.parquet" --force
trace replay "$test" --split all --router policy --param path="$out/policy.pt" --out "$results/policy.parquet" --force
# the ablation: the step that triggered escalation is discarded and rewritten by the large model
trace replay "$test" --split all --router policy --param path="$out/policy-replace.pt" --param escalate=replace \
  --out "$results/policy-replace.parquet" --force
replay steer-switch-replace --router steer --param mode=switch --param escalate=replace \
  --param gmms="$out/steer.json" --sweep tau=0:1:0.1

trace report "$test" "$results/"*.parquet --split all --pick-on "$calibration" --out "$out/report" \
  --policy-log "$out/policy.log.parquet" --steer-gmm "$out/steer.json" --table cmdp --table cascade
echo "traces: $train (fit, calibrate) and $test (report)   report: $out/report/index.html"
