# On the GPU machine, from the repository root: kernel tests at real shapes, the integration
# tests, then the kernel benchmarks. Logs and JSON go to $OUT.
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
HYBRIDLAB_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-300} python -P -m pytest \
    "$ROOT"/tests/test_ssd_triton.py "$ROOT"/tests/test_conv1d_norm_triton.py \
    "$ROOT"/tests/test_selective_attention_triton.py "$ROOT"/tests/test_gpu_integration.py \
    -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
if [ -z "$SKIP_BENCH" ]; then
  timeout ${BENCH_TIMEOUT:-200} python -P -m hybridlab bench kernels --json "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log" | tail -30
  timeout ${BENCH_TIMEOUT:-200} python -P -m hybridlab bench attention --json "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log" | tail -30
fi
