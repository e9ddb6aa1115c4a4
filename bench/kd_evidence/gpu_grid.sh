#!/usr/bin/env bash
# The KD evidence grid of a student on the project's GPU machine (issue #15): as many runs
# of the chosen cells as fit in BUDGET seconds, brought back as run folders.
#
#   bash bench/devcarry.sh --kd-evidence runs/kd-evidence     # here, first (about 57 MiB;
#                                               # for s3d: ... runs/kd-evidence teacher3d)
#   # then through the device tool, with carry [".devcarry"] and timeout_s about BUDGET + 90:
#   OUT=$OUT BUDGET=480 CELLS="hinton_unlabelled_tuned" bash bench/kd_evidence/gpu_grid.sh s1
#
# There, nothing is installed (bench/gpu_env.sh). The cohort is written again with `mtkd synth`
# (bench/kd_evidence/cohort.args, as run.sh does) and must have the carried digest
# (bench/kd_evidence/cohort_digest.py), the carried teachers go where run.sh keeps them, and
# run.sh runs the grid on the GPU (DEVICE, default cuda), JOBS runs at once (default 12), until
# BUDGET (default 480 s) is up; then it is stopped, as an interrupted grid is. Into $OUT go:
#   <grid>-runs.tar.gz  every finished run's folder (without checkpoints), relative to the grid;
#   runs.csv            their scores (bench/kd_evidence/partial_summary.py --write);
#   grid.log, gpu.txt   the grid's output; the GPU, torch and MONAI versions.
# Back here: `tar --skip-old-files -xzf <grid>-runs.tar.gz -C runs/kd-evidence/<grid>` (a run
# finished here is kept: the GPU may have trained it again, e.g. a published cell's seeds that a
# sweep's selection repeats); `mtkd ablate` and partial_summary.py take finished runs as they are. Say in BENCHMARKS.md which runs were
# trained on the GPU: the numbers of a run differ from a CPU run's, not its protocol.
set -uo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${1:?usage: bench/kd_evidence/gpu_grid.sh s1|s2|s3d|s1_label_free|s2_label_free|s3d_label_free}
case ${STUDENT%_label_free} in
  s1 | s2) KIND=teacher2d ;;
  s3d) KIND=teacher3d ;;
  *) echo "gpu_grid.sh runs s1, s2 or s3d (or their _label_free grids), not $STUDENT" >&2; exit 2 ;;
esac
[ -d ".devcarry/kd_evidence/teachers/$KIND-split0" ] || {
  echo "$STUDENT needs the carried $KIND teachers: bash bench/devcarry.sh --kd-evidence RUNS $KIND" >&2
  exit 2
}
OUT=${OUT:?set OUT, the folder that comes back}
BUDGET=${BUDGET:-480}
export DEVICE=${DEVICE:-cuda} JOBS=${JOBS:-12} CELLS=${CELLS:-}
export MTKD=${MTKD:-python3 -m mtkd} PYTHON=${PYTHON:-python3}
export OUT_GRID=runs/kd-evidence
mkdir -p "$OUT"
[ -n "${SKIP_GPU_ENV:-}" ] || source bench/gpu_env.sh
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PYTHON -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"
} > "$OUT/gpu.txt"

COHORT=$OUT_GRID/cohort
[ -f "$COHORT/dataset.json" ] || $MTKD synth "$COHORT" $(cat bench/kd_evidence/cohort.args) > /dev/null
$PYTHON bench/kd_evidence/cohort_digest.py "$COHORT" --check "$(cat .devcarry/kd_evidence/cohort.sha256)" \
  || exit 1
mkdir -p "$OUT_GRID/teachers/cohort"
cp -rn .devcarry/kd_evidence/teachers/. "$OUT_GRID/teachers/cohort/"

# the grid in a process group of its own, stopped as a whole when the budget is up
OUT=$OUT_GRID COHORT=$COHORT setsid bash bench/kd_evidence/run.sh "$STUDENT" > "$OUT/grid.log" 2>&1 &
grid=$!
(sleep "$BUDGET"; kill -TERM -- "-$grid" 2>/dev/null; sleep 20; kill -KILL -- "-$grid" 2>/dev/null) &
watchdog=$!
wait "$grid"
echo "the grid ended with status $? after at most $BUDGET s" >> "$OUT/grid.log"
kill "$watchdog" 2>/dev/null

GRID_DIR=$OUT_GRID/$STUDENT
finished=$(cd "$GRID_DIR" 2>/dev/null && find cells -path '*/report/ablation_result.json' | sed 's#/report/ablation_result.json##' | sort)
echo "$(echo "$finished" | grep -c .) finished runs" | tee -a "$OUT/grid.log"
set -f  # run folders' names hold [ and ]: no globbing of $finished
if [ -n "$finished" ]; then
  tar -czf "$OUT/$STUDENT-runs.tar.gz" -C "$GRID_DIR" --exclude=checkpoints $finished
  $PYTHON bench/kd_evidence/partial_summary.py "$GRID_DIR" --write "$OUT/runs.csv" | tail -20
fi
