#!/usr/bin/env bash
# The GPU checks and benchmarks, as run on the project's GPU machine (an H100/H200 with
# PyTorch preinstalled and no network). Nothing is installed: the packages the engine needs
# beyond that machine's image (MONAI, SimpleITK, nibabel; `bash bench/devcarry.sh`) and the
# full-size CT volumes and the benchmark student (see BENCHMARKS.md) are carried in .devcarry/
# and unpacked under /tmp (bench/gpu_env.sh).
#
#   OUT=results bash bench/gpu_run.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" \
  | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout 100 python3 -m pytest -q -p no:cacheprovider Testing/engine/test_gpu.py 2>&1 \
  | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 270 python3 bench/inference_speed.py --device cuda --repeats 3 --work /tmp/bench \
  --student .devcarry/student_model --carry .devcarry ${BENCH_ARGS:-} --out "$OUT/inference_gpu.json" \
  > "$OUT/inference_gpu.log" 2>&1
tail -30 "$OUT/inference_gpu.log"
# issue #19: the student's pass with memory saving on (its peak against MONAI's sliding
# window's), and where the time of one segmentation goes, stage by stage
timeout 120 python3 bench/inference_speed.py --device cuda --repeats 3 --work /tmp/bench \
  --student .devcarry/student_model --volumes synthetic --teachers --memory-limit 512 \
  --out "$OUT/inference_gpu_memory_limit.json" > "$OUT/inference_gpu_memory_limit.log" 2>&1
tail -5 "$OUT/inference_gpu_memory_limit.log"
timeout 90 python3 bench/inference_profile.py --device cuda --repeats 3 --work /tmp/bench \
  --student .devcarry/student_model --volumes /tmp/bench/synthetic_512.nii \
  --out "$OUT/profile_gpu.json" > "$OUT/profile_gpu.log" 2>&1
tail -25 "$OUT/profile_gpu.log"
# issue #19: post-processing on the GPU (torch connected parts) against SciPy on the host
timeout 120 python3 bench/postprocess_speed.py --device cuda --repeats 3 \
  > "$OUT/postprocess_gpu.log" 2>&1
tail -6 "$OUT/postprocess_gpu.log"
# data-parallel distillation with NCCL and mixed precision, 1..(number of GPUs) processes
GPUS=$(nvidia-smi -L | wc -l)
timeout 200 python3 bench/ddp_throughput.py --device cuda --amp --work /tmp/bench-ddp \
  --nproc $(seq 1 "$GPUS") --out "$OUT/ddp_gpu.json" > "$OUT/ddp_gpu.log" 2>&1
tail -12 "$OUT/ddp_gpu.log"
