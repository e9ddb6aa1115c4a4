#!/usr/bin/env bash
# Writes .devcarry/: what the project's GPU machine (PyTorch preinstalled, no network) needs
# beyond its image, carried there by the device tool (`carry: [".devcarry"]`, at most 64 MiB).
#
#   bash bench/devcarry.sh                       # MONAI and nibabel wheels, SimpleITK (xz)
#   bash bench/devcarry.sh --kd-evidence RUNS    # and the KD evidence grid's 2-D teachers
#   bash bench/devcarry.sh --kd-evidence RUNS teacher3d   # or its 3-D teachers instead
#
# Packages: the versions installed here, MONAI and nibabel as wheels, SimpleITK as an xz tar of
# its installed folder (its wheel is an abi3 build for Linux x86-64); bench/gpu_env.sh puts them
# on PYTHONPATH there. --kd-evidence RUNS (the folder that holds cohort/ and teachers/, e.g.
# runs/kd-evidence): the teachers of every split seed (teacher2d, or the kind named after RUNS;
# both do not fit), without their checkpoints, replacing the teachers carried before, and the
# cohort's digest (bench/kd_evidence/cohort_digest.py). The cohort itself does not fit: the GPU
# script writes it again with `mtkd synth` and checks the digest. Files already there are kept.
set -euo pipefail
KD=""
USAGE="usage: bench/devcarry.sh [--kd-evidence RUNS [teacher2d|teacher3d]]"
if [ "${1:-}" = "--kd-evidence" ]; then
  KD=$(cd "${2:?$USAGE}" && pwd)  # from where it was given
  KIND=${3:-teacher2d}
  case $KIND in teacher2d | teacher3d) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
elif [ -n "${1:-}" ]; then
  echo "$USAGE" >&2; exit 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CARRY=.devcarry
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$CARRY"
version() { $PYTHON -c "import importlib.metadata as m; print(m.version('$1'))"; }
for package in monai nibabel; do
  if ! ls "$CARRY"/"$package"-*.whl >/dev/null 2>&1; then
    $PYTHON -m pip download --quiet --no-deps --only-binary=:all: -d "$CARRY" \
      "$package==$(version "$package")"
  fi
done
if [ ! -f "$CARRY/sitk.tar.xz" ]; then
  SITE=$($PYTHON -c "import pathlib, SimpleITK; print(pathlib.Path(SimpleITK.__file__).parent.parent)")
  tar -cf - -C "$SITE" SimpleITK "simpleitk-$(version SimpleITK).dist-info" \
    | xz -T0 -6 > "$CARRY/sitk.tar.xz.part"
  mv "$CARRY/sitk.tar.xz.part" "$CARRY/sitk.tar.xz"
fi
if [ -n "$KD" ]; then
  rm -rf "$CARRY/kd_evidence/teachers"
  for teacher in "$KD"/teachers/cohort/"$KIND"-split*; do
    [ -f "$teacher/model/mtkd_model.json" ] || { echo "no finished teacher in $teacher" >&2; exit 2; }
    target=$CARRY/kd_evidence/teachers/$(basename "$teacher")
    mkdir -p "$target"
    for item in model config.yaml split.json fingerprint.json events.jsonl report; do
      [ -e "$teacher/$item" ] && cp -r "$teacher/$item" "$target/"
    done
  done
  $PYTHON bench/kd_evidence/cohort_digest.py "$KD/cohort" > "$CARRY/kd_evidence/cohort.sha256"
fi
size=$(du -sb "$CARRY" | cut -f1)
echo "$CARRY: $((size / 1024 / 1024)) MiB"
if [ "$size" -gt "$LIMIT" ]; then
  echo "$CARRY is over the device tool's 64 MiB carry limit" >&2; exit 1
fi
