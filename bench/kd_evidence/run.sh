#!/usr/bin/env bash
# The KD evidence grid of one student (issue #15), run or resumed with one command:
#   bash bench/kd_evidence/run.sh s1        # or s2, s3d; or s1_label_free, s2_label_free,
#                                           # s3d_label_free (label-free distillation)
# 1. the cohort (`mtkd synth`, if missing); 2. one teacher per split seed of the student's grid
#    (bench/kd_evidence/teacher2d.yaml or teacher3d.yaml at that split seed; a *_label_free grid
#    uses its base student's teachers), trained or resumed; 3. the finished runs archived in
#    bench/results/kd_evidence/<grid>/archive/ restored into $OUT/<grid> where it lacks them (a
#    wiped machine; bench/kd_evidence/archive.py: not for another cohort, nor distilled runs of
#    a teacher retrained since); 4. `mtkd ablate bench/kd_evidence/<grid>.yaml` in $OUT/<grid>
#    (resumes); 5. its finished runs' light files (no weights) archived there again, whether
#    it finished or stopped; 6. runs.csv, results.csv, summary.json, evidence.md and plots/
#    (validation curves, test scores) copied to bench/results/kd_evidence/<grid>/ (with a file
#    PARTIAL while the grid is unfinished; not while the grid folder lacks finished runs that the
#    committed runs.csv holds); 7. real_ct.csv there: every finished run with its
#    weights and the teachers scored on the bundled real CT (bench/kd_evidence/real_ct.py, an
#    external check; restored runs keep their rows).
# Re-running continues where it stopped (commit the archive: it outlives a wiped machine). While
# a grid still runs, `python bench/kd_evidence/archive.py save $OUT/<grid>
# bench/results/kd_evidence/<grid>/archive --cohort $COHORT --teacher <each teacher run>`
# archives the runs finished so far (before a session ends).
# Environment: COHORT, SYNTH_ARGS, OUT, DEVICE, MTKD, PYTHON, TEACHER (another teacher config of
# this folder, e.g. teacher2d_mae: its own teachers, and the grid's folders get the suffix
# -<teacher>), JOBS (runs, and teachers, trained at once; default 1), CELLS (run only these cells
# now, e.g. CELLS="no_kd pmd_unlabelled"; the others are left for a later call and the copied
# results say PARTIAL).
set -euo pipefail
cd "$(dirname "$0")/../.."

COHORT=${COHORT:-runs/kd-evidence/cohort}      # the dataset: any MSD folder; written if missing
SYNTH_ARGS=${SYNTH_ARGS:-$(cat bench/kd_evidence/cohort.args)}  # calibrated
OUT=${OUT:-runs/kd-evidence}
DEVICE=${DEVICE:-}                              # e.g. cuda; empty: the configs' train.device
MTKD=${MTKD:-mtkd}
PYTHON=${PYTHON:-python}

STUDENT=${1:?usage: bench/kd_evidence/run.sh s1|s2|s3d|s1_label_free|s2_label_free|s3d_label_free}
CONFIG=bench/kd_evidence/$STUDENT.yaml
[ -f "$CONFIG" ] || { echo "no $CONFIG" >&2; exit 2; }
case ${STUDENT%_label_free} in
  s3d) DEFAULT_TEACHER=teacher3d ;;
  *) DEFAULT_TEACHER=teacher2d ;;
esac
TEACHER=${TEACHER:-$DEFAULT_TEACHER}
[ -f "bench/kd_evidence/$TEACHER.yaml" ] || { echo "no bench/kd_evidence/$TEACHER.yaml" >&2; exit 2; }
GRID=$STUDENT                                   # the grid's folder names
[ "$TEACHER" = "$DEFAULT_TEACHER" ] || GRID=$STUDENT-$TEACHER
JOBS=${JOBS:-1}
CELLS=${CELLS:-}
DEVICE_ARG=()
[ -n "$DEVICE" ] && DEVICE_ARG=(--device "$DEVICE")
GRID_ARGS=(--jobs "$JOBS")
[ -n "$CELLS" ] && GRID_ARGS+=(--cells $CELLS)

[ -f "$COHORT/dataset.json" ] || $MTKD synth "$COHORT" $SYNTH_ARGS

# teachers per cohort and split seed: a new cohort gets new teachers
TEACHERS=$OUT/teachers/$(basename "$COHORT")
train_teacher() {  # config: train, resume or skip its teacher
  local run=$TEACHERS/$(basename "$1" .yaml)
  if [ -f "$run/model/mtkd_model.json" ]; then
    return 0
  elif [ -f "$run/checkpoints/last.pt" ]; then
    $MTKD train --resume "$run" "${DEVICE_ARG[@]}"
  else
    $MTKD train "$1" --run-dir "$run" "${DEVICE_ARG[@]}"
  fi
}
pids=()
for config in $($PYTHON bench/kd_evidence/teacher_config.py "$CONFIG" \
    "bench/kd_evidence/$TEACHER.yaml" "$COHORT" "$TEACHERS/configs"); do
  if [ "$JOBS" -gt 1 ]; then  # JOBS teachers at once, each with its share of the cores
    OMP_NUM_THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 )) train_teacher "$config" &
    pids+=($!)
    if [ ${#pids[@]} -ge "$JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  else
    train_teacher "$config"
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

RESULTS=bench/results/kd_evidence/$GRID
mkdir -p "$RESULTS"
TEACHER_ARGS=()  # the grid's finished teachers, one per split seed
for run in "$TEACHERS/$TEACHER"-split*; do
  [ -f "$run/model/mtkd_model.json" ] && TEACHER_ARGS+=(--teacher "$run")
done
# the finished runs of an earlier session (the machine may have been wiped since)
$PYTHON bench/kd_evidence/archive.py restore "$RESULTS/archive" "$OUT/$GRID" --cohort "$COHORT" \
  "${TEACHER_ARGS[@]}"
status=0
$MTKD ablate "$CONFIG" -o "$OUT/$GRID" --data "$COHORT" \
  --teacher "$TEACHERS/$TEACHER-split{split_seed}" "${DEVICE_ARG[@]}" "${GRID_ARGS[@]}" || status=$?
$PYTHON bench/kd_evidence/archive.py save "$OUT/$GRID" "$RESULTS/archive" --cohort "$COHORT" \
  "${TEACHER_ARGS[@]}" || echo "warning: archiving the finished runs failed (see above)" >&2
covers() {  # whether runs.csv $1 holds every (cell, split seed, seed) run of runs.csv $2
  $PYTHON - "$1" "$2" <<'PY'
import csv, sys
runs = lambda path: {(r["cell"], r["split_seed"], r["seed"]) for r in csv.DictReader(open(path))}
sys.exit(0 if runs(sys.argv[2]) <= runs(sys.argv[1]) else 1)
PY
}
COPIED=1  # whether this pass's results were copied to $RESULTS
if [ -f "$RESULTS/runs.csv" ] && [ -f "$OUT/$GRID/runs.csv" ] \
    && ! covers "$OUT/$GRID/runs.csv" "$RESULTS/runs.csv"; then
  # a grid folder written afresh without the runs committed earlier: keep the committed results
  COPIED=0
  echo "warning: $OUT/$GRID lacks finished runs that $RESULTS/runs.csv holds; its results were" \
    "not copied there (restore those runs or train them again first)" >&2
else
  for name in runs.csv results.csv summary.json evidence.md plots/curves.png plots/dice.png; do
    [ -f "$OUT/$GRID/$name" ] && mkdir -p "$(dirname "$RESULTS/$name")" && cp "$OUT/$GRID/$name" "$RESULTS/$name"
  done
fi
# the external check: every finished run and the teachers on the bundled real CT
$PYTHON bench/kd_evidence/real_ct.py "$OUT/$GRID" "$RESULTS/real_ct.csv" "${TEACHER_ARGS[@]}" \
  "${DEVICE_ARG[@]}" || echo "warning: the real-CT scoring failed (see above)" >&2
if [ $status -ne 0 ]; then
  echo "PARTIAL: the grid stopped ($(date -u +%FT%TZ), exit $status); runs.csv holds the" \
    "finished runs; summary.json/evidence.md are from an earlier complete pass, if any." \
    "Run bench/kd_evidence/run.sh $STUDENT again (same TEACHER) to continue." > "$RESULTS/PARTIAL"
  exit $status
fi
if [ "$COPIED" -eq 0 ]; then
  echo "PARTIAL: $OUT/$GRID lacks finished runs that runs.csv here holds ($(date -u +%FT%TZ));" \
    "the results here are the committed ones, not this pass's. Restore those runs or train them" \
    "again, then run bench/kd_evidence/run.sh $STUDENT again." > "$RESULTS/PARTIAL"
elif [ -n "$CELLS" ]; then
  echo "PARTIAL: only the cells $CELLS were run ($(date -u +%FT%TZ)); summary.json lists the" \
    "others under not_run. Run bench/kd_evidence/run.sh $STUDENT again without CELLS (same" \
    "TEACHER) for the whole grid." > "$RESULTS/PARTIAL"
else
  rm -f "$RESULTS/PARTIAL"
fi
