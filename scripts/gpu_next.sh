#!/usr/bin/env bash
# The H200 runs left open at the end of session 8 (2026-12-03), in one call. From the repository
# root, with the tree carried (e.g. as a snapshot): bash scripts/gpu_next.sh "$OUT"
#   1. issue 18: taipan-190m on prepared data, 0.5M-token steps, packed vs unpacked tokens/s
#   2. issue 18: torchrun DDP and FSDP2 with NCCL/bf16 on one GPU, sharded resume, micro-batch probe
#   3. issue 18: packed-documents attention against unpacked and against separate rows
set -u
OUT=${1:-/tmp/next_out}
mkdir -p "$OUT"
ROOT=$(pwd)
timeout 240 bash scripts/gpu_pack.sh "$OUT" > "$OUT/pack.log" 2>&1
timeout 200 bash scripts/gpu_distributed/run.sh > "$OUT/distributed.log" 2>&1
(source scripts/gpu_env.sh; cd /tmp; timeout 120 python -P "$ROOT/scripts/gpu_pack_attention.py") > "$OUT/pack_attention.log" 2>&1
tail -n 20 "$OUT"/*.log
