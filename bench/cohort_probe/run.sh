#!/usr/bin/env bash
# Calibration of the CT-like cohort (issue #15; BENCHMARKS.md, "CT-like cohort calibration"):
# for each difficulty, a cohort of 32 phantoms (`mtkd synth --style ct`), the 2-D teacher and
# S1 alone on half the labelled training subjects, each scored on the test subjects. The target:
# teacher >= 0.85 mean test Dice, S1 alone >= 8 points below it. One seed, one split: it
# calibrates the cohort and decides nothing about the methods.
#   bash bench/cohort_probe/run.sh                      (MTKD="python -m mtkd" in the dev env)
#   DIFFICULTIES="0.3 0.5" JOBS=2 bash bench/cohort_probe/run.sh   (two difficulties at once)
set -euo pipefail
cd "$(dirname "$0")/../.."
MTKD=${MTKD:-mtkd}
OUT=${OUT:-runs/cohort-probe}
HERE=bench/cohort_probe
DIFFICULTIES=${DIFFICULTIES:-"0.3 0.5"}
JOBS=${JOBS:-1}

probe() {  # difficulty: cohort, teacher, S1 alone, test scores under $OUT/d<difficulty>/
  local dir=$OUT/d$1
  mkdir -p "$dir/configs"
  [ -f "$dir/cohort/dataset.json" ] ||
    $MTKD synth "$dir/cohort" --style ct --subjects 32 --seed 0 --difficulty "$1"
  for model in teacher s1_nokd; do
    local run=$dir/$model
    sed "s#^  source: .*#  source: $(realpath "$dir/cohort")#" "$HERE/$model.yaml" \
      > "$dir/configs/$model.yaml"
    if [ ! -f "$run/model/mtkd_model.json" ]; then
      if [ -f "$run/checkpoints/last.pt" ]; then
        $MTKD train --resume "$run"
      else
        $MTKD train "$dir/configs/$model.yaml" --run-dir "$run"
      fi
    fi
    $MTKD evaluate "$run/model" "$dir/cohort" --split "$run/split.json" --subset test \
      --csv "$dir/report/$model.csv"
  done
}

pids=()
for difficulty in $DIFFICULTIES; do
  if [ "$JOBS" -gt 1 ]; then
    OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 )) probe "$difficulty" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  else
    probe "$difficulty"
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
