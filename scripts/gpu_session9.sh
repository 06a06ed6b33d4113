#!/usr/bin/env bash
# Session 9's H200 call for issue 17 (custom ops, launch overhead, compile) and issue 18 (where
# packed training loses time). From the repository root: bash scripts/gpu_session9.sh OUT_DIR
set -u
OUT=${1:-/tmp/s9_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
cd /tmp
HYBRIDLAB_AUTOTUNE=0 timeout 150 python -P -m pytest -q -x -p no:cacheprovider -m gpu \
  "$ROOT"/tests/test_custom_ops*.py "$ROOT"/tests/test_selective_attention_triton.py > "$OUT/gpu_tests.log" 2>&1
tail -n 3 "$OUT/gpu_tests.log"
timeout 300 python -P "$ROOT/scripts/gpu_speed.py" --sections env,attention,ssd,train > "$OUT/speed.log" 2>&1
grep -v "^\s*$" "$OUT/speed.log" | grep -i "C=\|SSD B\|SSD per\|train B\|window\|error\|Error" | head -40
timeout 90 python -P "$ROOT/scripts/gpu_pack_profile.py" > "$OUT/pack_profile.log" 2>&1
grep "fwd+bwd\|Error" "$OUT/pack_profile.log"
