#!/usr/bin/env bash
# Session 9's third H200 call (issue 18): the SSD backward's packed path skips the document
# test in chunks that hold one document; GPU tests of the packed SSD, and where packed training
# time goes, again.   bash scripts/gpu_session9c.sh OUT_DIR   (from the repository root)
set -u
OUT=${1:-/tmp/s9c_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
cd /tmp
HYBRIDLAB_AUTOTUNE=0 timeout 100 python -P -m pytest -q -x -p no:cacheprovider -m gpu \
  "$ROOT/tests/test_ssd_triton.py" -k packed > "$OUT/ssd_tests.log" 2>&1
tail -n 2 "$OUT/ssd_tests.log"
timeout 200 python -P "$ROOT/scripts/gpu_pack_profile.py" > "$OUT/pack_profile.log" 2>&1
grep "fwd+bwd\|warmed\|Error\|_bwd_dc\|_bwd_dx_db\|of kernels" "$OUT/pack_profile.log"
