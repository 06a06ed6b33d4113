#!/usr/bin/env bash
# Session 9's second H200 call: eager kernels through their autograd.Functions again (ops only
# under torch.compile), taipan-190m compiled vs eager, where packed training loses time.
#   bash scripts/gpu_session9b.sh OUT_DIR   (from the repository root)
set -u
OUT=${1:-/tmp/s9b_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
cd /tmp
timeout 330 python -P "$ROOT/scripts/gpu_speed.py" --sections attention,ssd,train > "$OUT/speed.log" 2>&1
grep -i "C=\|SSD B\|SSD per\|train B\|window\|Error" "$OUT/speed.log" | head -40
timeout 170 python -P "$ROOT/scripts/gpu_pack_profile.py" > "$OUT/pack_profile.log" 2>&1
grep "fwd+bwd\|warmed\|Error" "$OUT/pack_profile.log"
