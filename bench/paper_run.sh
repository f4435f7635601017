#!/usr/bin/env bash
# Table 1 on split 0 within a deadline: the demo dataset and the cache once, then the cases concurrently
# (each its own process on the one device), then the results (incomplete runs labelled partial), every
# run's log and the epoch profile under STAGE. Called by bench/gpu_suite.sh (part `paper`).
# Usage: bash bench/paper_run.sh PRESET SECONDS STAGE     (PAPER_CASES: the cases, L_Exp(0.3) first)
set -uo pipefail
cd "$(dirname "$0")/.."
preset=$1 deadline=$(( $(date +%s) + $2 )) stage=$3
runs=/tmp/expseg-table1-$preset
cases="${PAPER_CASES:-exp_g0.3 linear_dice log_dice_g1 cross_g1 exp_g1 exp_g2 vnet_exp_g0.3}"
"${PYTHON:-python3}" scripts/reproduce_table1.py --preset "$preset" --runs "$runs" --prepare-only || exit 1
echo "data and cache prepared; $(( deadline - $(date +%s) )) s left for training"
pids=()
for case in $cases; do
  timeout $(( deadline - $(date +%s) - 30 )) "${PYTHON:-python3}" scripts/reproduce_table1.py --preset "$preset" --runs "$runs" \
    --splits 0 --cases "$case" --train-only > "$stage/paper-$case.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
results="$stage/table1-$preset"
"${PYTHON:-python3}" scripts/reproduce_table1.py --preset "$preset" --runs "$runs" --results "$results" --collect-only --partial || exit 1
for case in $cases; do
  cp "$runs/$case-split0/log.jsonl" "$results/$case-split0.jsonl" 2> /dev/null
done
"${PYTHON:-python3}" -m bench.epoch_profile "$results"/*-split0.jsonl --out "$stage/epoch_profile.md"
