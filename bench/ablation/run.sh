#!/usr/bin/env bash
# The ablation benchmark of BENCHMARKS.md ("Ablation"), on the CPU:
#   bash bench/ablation/run.sh
# A SYNTHETIC cohort of 24 phantoms, a 2-D teacher, `mtkd ablate` for the 2-D students S1 and
# S2, then a 3-D teacher and the 3-D pair; 3 seeds each. Re-running continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
MTKD=${MTKD:-mtkd}
OUT=runs/bench-ablation

teacher() {  # train (or finish) the teacher run $1 from bench/ablation/$1.yaml
  [ -f $OUT/$1/model/mtkd_model.json ] && return
  if [ -f $OUT/$1/checkpoints/last.pt ]; then
    $MTKD train --resume $OUT/$1
  else
    $MTKD train bench/ablation/$1.yaml --run-dir $OUT/$1
  fi
}

[ -f $OUT/cohort/dataset.json ] || $MTKD synth $OUT/cohort --subjects 24 --seed 0
teacher teacher
$MTKD ablate bench/ablation/s1.yaml -o $OUT/s1
$MTKD ablate bench/ablation/s2.yaml -o $OUT/s2
teacher teacher3d
$MTKD ablate bench/ablation/s3d.yaml -o $OUT/s3d
