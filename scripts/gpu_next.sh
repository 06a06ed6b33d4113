#!/usr/bin/env bash
# The H200 runs left open at the end of session 9 (2026-12-03), in one call. From the repository
# root, with the tree carried (e.g. as a snapshot): bash scripts/gpu_next.sh "$OUT"
#   1. issue 18: taipan-190m on prepared data, 0.5M-token steps: packed vs unpacked tokens/s
#      since the SSD backward's one-document fast path (criterion: within 5%), and packed
#      through `compile: true` in `hybridlab train` (issue 17: compile's default)
#   2. issue 17: where the compiled training step's time goes (per-kernel table), for MFU
set -u
OUT=${1:-/tmp/next_out}
mkdir -p "$OUT"
ROOT=$(pwd)
timeout 330 bash scripts/gpu_pack.sh "$OUT" > "$OUT/pack.log" 2>&1
(source scripts/gpu_env.sh; cd /tmp; timeout 200 python -P "$ROOT/scripts/gpu_pack_profile.py" --compile) \
  > "$OUT/pack_profile.log" 2>&1
tail -n 20 "$OUT"/*.log
