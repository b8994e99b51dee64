#!/usr/bin/env bash
# The reference study, unattended: the seeds' Table 1 (CMDP routing: accuracy and cost of every router; the
# cascade: accuracy, PD and reduced compute of each chain) on GSM8K (1,319 problems) and MATH500 (500) with
# Qwen2.5-Math-1.5B-Instruct (small) and -7B-Instruct (large). Per dataset, into OUT/NAME:
#   gen at T = 0.7 with "\n\n" steps: the comb, then closure over scripts/study_routers.toml (RSD, SpecReason,
#   STEER, the cascade), which scores the PRM (Skywork), the large model's judge and first-token P(T) on the way
#   and stores the small model's prompt hidden states at layer 24 (P(IK))  ->  verifier scores (the policy's
#   coverage)  ->  validate, info  ->  train the CMDP policy (escalate=after and =replace), STEER's mixtures, the
#   P(IK) probe  ->  replay every router  ->  report --table cmdp --table cascade.
# The plan (these commands), the memory plan and the estimates of GPU-hours, tokens and disk
# (scripts/study_plan.py) are printed before anything starts; --dry-run prints them only.
# Rerunning the same command resumes: gen and score continue where they stopped (nothing is redone), the CPU
# steps after them (minutes) run again.
#
#   bash scripts/study_gsm8k.sh [--dry-run] [--out DIR] [--datasets gsm8k,math500] [--limit N]
#       [--small MODEL] [--large MODEL] [--backend vllm|hf] [--policy-steps N] [--gpu-memory-gib G]
#       [-- trace gen options, e.g. --tensor-parallel-size large=2 --gpu-memory-utilization 0.9]
#
# A dataset is a name (read from the benchmarks folder) or NAME=PATH (a JSONL file in that format). Needs the
# package with an engine (pip install ".[gpu,qwen]" on a GPU machine; ".[hf,qwen]" with --backend hf).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=runs/study
datasets=gsm8k,math500
limit=""
small=qwen2.5-math-1.5b
large=qwen2.5-math-7b
backend=""
policy_steps=1000
gpu_memory_gib=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --out) out="$2"; shift 2 ;;
    --datasets) datasets="$2"; shift 2 ;;
    --limit) limit="$2"; shift 2 ;;
    --small) small="$2"; shift 2 ;;
    --large) large="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --policy-steps) policy_steps="$2"; shift 2 ;;
    --gpu-memory-gib) gpu_memory_gib="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "study_gsm8k.sh: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
  esac
done
gen_options=("$@")
routers=scripts/study_routers.toml

run() {  # print a step of the plan; run it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$dry_run" = 0 ]; then "$@"; fi
}

plan=(python scripts/study_plan.py --datasets "$datasets" --small "$small" --large "$large")
[ -n "$limit" ] && plan+=(--limit "$limit")
[ -n "$backend" ] && plan+=(--backend "$backend")
[ -n "$gpu_memory_gib" ] && plan+=(--gpu-memory-gib "$gpu_memory_gib")
"${plan[@]}" -- "${gen_options[@]}"

IFS=, read -r -a items <<< "$datasets"
for item in "${items[@]}"; do
  name="${item%%=*}"
  trace="$out/$name"
  results="$trace/results"
  echo "== $item -> $trace"
  gen=(trace gen --model "$small" --large "$large" --dataset "$item" --temperature 0.7
       --expand closure --routers "$routers" --out "$trace")
  [ -n "$limit" ] && gen+=(--limit "$limit")
  [ -n "$backend" ] && gen+=(--backend "$backend")
  run "${gen[@]}" "${gen_options[@]}"
  score=(trace score "$trace" --scorer verifier)
  [ -n "$backend" ] && score+=(--backend "$backend")
  run "${score[@]}"
  run trace validate "$trace"
  run trace info "$trace"

  run trace train policy "$trace" --steps "$policy_steps" --seed 0 --out "$trace/policy.pt" --force
  run trace train policy "$trace" --steps "$policy_steps" --seed 0 --escalate replace \
    --out "$trace/policy-replace.pt" --force
  run trace train steer "$trace" --out "$trace/steer.json" --force
  run trace train pik "$trace" --model small --out "$trace/pik.joblib" --force

  run mkdir -p "$results"
  for router in small-only large-only oracle; do
    run trace replay "$trace" --split all --router "$router" --out "$results/$router.parquet" --force
  done
  run trace replay "$trace" --split all --router random --sweep p=0:1:0.1 --out "$results/random.parquet" --force
  run trace replay "$trace" --split all --router rsd --sweep tau=0:1:0.1 --out "$results/rsd.parquet" --force
  run trace replay "$trace" --split all --router specreason --sweep tau=0:9:1 \
    --out "$results/specreason.parquet" --force
  run trace replay "$trace" --split all --router steer --param mode=step --param gmms="$trace/steer.json" \
    --sweep tau=0:1:0.1 --out "$results/steer-step.parquet" --force
  run trace replay "$trace" --split all --router steer --param mode=switch --param gmms="$trace/steer.json" \
    --sweep tau=0:1:0.1 --out "$results/steer-switch.parquet" --force
  run trace replay "$trace" --split all --router steer --param mode=switch --param escalate=replace \
    --param gmms="$trace/steer.json" --sweep tau=0:1:0.1 --out "$results/steer-switch-replace.parquet" --force
  run trace replay "$trace" --split all --router cascade --param probe="$trace/pik.joblib" \
    --sweep t_true=0:1:0.1 --sweep t_ik=0:1:0.1 --out "$results/cascade.parquet" --force
  run trace replay "$trace" --split all --router cascade --param pik=false --sweep t_true=0:1:0.1 \
    --out "$results/cascade-no-pik.parquet" --force
  run trace replay "$trace" --split all --router policy --param path="$trace/policy.pt" \
    --out "$results/policy.parquet" --force
  run trace replay "$trace" --split all --router policy --param path="$trace/policy-replace.pt" \
    --param escalate=replace --out "$results/policy-replace.parquet" --force
  run trace report "$trace" "$results"/*.parquet --out "$trace/report" --policy-log "$trace/policy.log.parquet" \
    --steer-gmm "$trace/steer.json" --table cmdp --table cascade
done
if [ "$dry_run" = 1 ]; then echo "dry run: nothing was started"; else echo "study: $out"; fi
