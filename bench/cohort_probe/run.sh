#!/usr/bin/env bash
# A one-seed probe of the CT-like cohort (issue #15, calibration; BENCHMARKS.md, "CT-like
# cohort probe"): the cohort, a 2-D teacher (25 epochs), S1 alone on half the labelled training
# subjects, and S1 distilled (the paper's recipe; Hinton KD) with the other training images as
# unlabelled ones; each scored on the test subjects. Not evidence: one seed, one split.
#   bash bench/cohort_probe/run.sh            (MTKD="python -m mtkd" in the dev environment)
set -euo pipefail
cd "$(dirname "$0")/../.."
MTKD=${MTKD:-mtkd}
OUT=runs/cohort-probe
HERE=bench/cohort_probe
run() {  # kind, name: train (or finish) $OUT/name from $HERE/name.yaml
  [ -f "$OUT/$2/model/mtkd_model.json" ] && return
  if [ -f "$OUT/$2/checkpoints/last.pt" ]; then
    $MTKD "$1" --resume "$OUT/$2"
  else
    $MTKD "$1" "$HERE/$2.yaml" --run-dir "$OUT/$2"
  fi
}
[ -f "$OUT/cohort/dataset.json" ] || $MTKD synth "$OUT/cohort" --style ct --subjects 24 --seed 0
run train teacher
run train s1_nokd
run distill s1_paper_unl
run distill s1_pmd_unl
for model in teacher s1_nokd s1_paper_unl s1_pmd_unl; do
  $MTKD evaluate "$OUT/$model/model" "$OUT/cohort" --split "$OUT/s1_nokd/split.json" \
    --subset test --csv "$OUT/report/$model.csv"
done
