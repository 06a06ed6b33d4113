# GPU call 1 (about 8 minutes): kernel + integration tests at real shapes (single tuning config),
# then the kernel benchmarks with autotuning. Logs and JSON land in $OUT.
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
HYBRIDLAB_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-230} python -P -m pytest \
    "$ROOT"/tests/test_gpu_integration.py "$ROOT"/tests/test_conv1d_norm_triton.py \
    "$ROOT"/tests/test_ssd_triton.py "$ROOT"/tests/test_selective_attention_triton.py \
    -p no:cacheprovider -rfE > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; tail -15 "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-150} python -P -m hybridlab bench kernels --json "$OUT/bench_kernels.json" > "$OUT/bench_kernels.log" 2>&1
echo "bench kernels exit $?"; tail -25 "$OUT/bench_kernels.log"
timeout ${BENCH_TIMEOUT:-150} python -P -m hybridlab bench attention --json "$OUT/bench_attention.json" > "$OUT/bench_attention.log" 2>&1
echo "bench attention exit $?"; tail -25 "$OUT/bench_attention.log"
