#!/usr/bin/env bash
# The GPU runs left open at the end of session 13 (2026-12-07), in one call. From the repository
# root, with the tree carried (e.g. as a snapshot): bash scripts/gpu_next.sh "$OUT"
# 1. The GPU tests (session 13 ran only the SAL, mixer and train files, on an H100).
# 2. Issue 17's MFU on the H200: `bench model --compile` (session 12: compiled 128.0 ms, 40.4%),
#    then the compiled model's kernel table (is the copy around the mixer op gone for good?).
# 3. The SSD's toy-size fault (P = N = 8, bf16) under compute-sanitizer where the image has it.
# `timeout -s KILL`: a cold machine's first compile and autotuning can outlast a soft limit.
set -u
OUT=${1:-/tmp/next_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
cd /tmp
HYBRIDLAB_AUTOTUNE=0 timeout -s KILL 300 python -P -m pytest -m gpu -q -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests" -rf > "$OUT/tests.log" 2>&1
grep -E "passed|failed|^FAILED" "$OUT/tests.log" | tail -8
timeout -s KILL 240 python -P -m hybridlab bench model "$ROOT/experiments/taipan-190m.yaml" --compile --contexts 1K \
  --no-anchors --steps 10 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
grep -E "train B8" "$OUT/bench.log"
timeout -s KILL 200 python -P "$ROOT/scripts/gpu_pack_profile.py" --compile --only "no seq_idx" --top 45 \
  > "$OUT/profile.log" 2>&1
grep -E "fwd\+bwd|kernels per call|mamba2_mixer" "$OUT/profile.log"
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SANITIZER" ]; then
  HYBRIDLAB_AUTOTUNE=0 timeout -s KILL 120 "$SANITIZER" --tool memcheck --print-limit 5 \
    python -P "$ROOT/scripts/gpu_ssd_toy.py" 4 32 8 8 8 1 16 bfloat16 > "$OUT/ssd_toy_memcheck.log" 2>&1
  grep -E "Invalid|at |by thread|ERROR SUMMARY" "$OUT/ssd_toy_memcheck.log" | head -12
else
  echo "no compute-sanitizer on this image"
  HYBRIDLAB_AUTOTUNE=0 CUDA_LAUNCH_BLOCKING=1 timeout -s KILL 60 python -P "$ROOT/scripts/gpu_ssd_toy.py" 4 32 8 8 8 1 16 bfloat16 2>&1 | tail -1
fi
