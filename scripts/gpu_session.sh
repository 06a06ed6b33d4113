# One GPU call: kernel + integration tests at real shapes (single tuning config), then the
# model benchmark of taipan-190m, mamba2-190m and transformerpp-190m. Everything lands in $OUT.
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
HYBRIDLAB_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-230} python -P -m pytest \
    "$ROOT"/tests/test_gpu_integration.py "$ROOT"/tests/test_conv1d_norm_triton.py \
    "$ROOT"/tests/test_ssd_triton.py "$ROOT"/tests/test_selective_attention_triton.py \
    -q -p no:cacheprovider -rfE > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; tail -25 "$OUT/gpu_tests.log"
for m in taipan-190m mamba2-190m transformerpp-190m; do
  timeout ${MODEL_TIMEOUT:-100} python -P -m hybridlab bench model "$ROOT/experiments/$m.yaml" --batch 8 \
      --seq-len 4096 --steps 5 --contexts 1K,8K,32K,128K,1M --time-budget 25 --json "$OUT/bench_$m.json" \
      > "$OUT/bench_$m.log" 2>&1
  echo "$m exit $?"; tail -9 "$OUT/bench_$m.log"
done
