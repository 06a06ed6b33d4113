# GPU call (about 6-9 minutes): GPU tests (TESTS="file.py ..." picks the files), the model
# benchmark of taipan-190m, mamba2-190m and transformerpp-190m in one call (training B8 L4096;
# decode with CUDA graphs), then the MQAR suite (MQAR=0 skips it). SWEEP=1 adds a time-boxed
# GPU-scale run of the SAL sweep (needs `carry: [".whl"]` for optuna, scripts/fetch_gpu_wheels.sh).
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
TESTS=${TESTS:-test_gpu_integration.py test_cross_entropy_triton.py test_conv1d_norm_triton.py}
HYBRIDLAB_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-90} python -P -m pytest -m gpu $(for t in $TESTS; do echo "$ROOT/tests/$t"; done) \
    -p no:cacheprovider -q -rfE > "$OUT/gpu_tests.log" 2>&1
echo "tests exit $?"; tail -6 "$OUT/gpu_tests.log" | cut -c1-300
for m in taipan-190m mamba2-190m transformerpp-190m; do
  timeout ${MODEL_TIMEOUT:-120} python -P -m hybridlab bench model "$ROOT/experiments/$m.yaml" --batch 8 \
      --seq-len 4096 --steps 5 --contexts ${CONTEXTS:-1K,8K,32K,128K} --time-budget 15 --cuda-graph \
      --json "$OUT/bench_$m.json" > "$OUT/bench_$m.log" 2>&1
  echo "$m exit $?"; grep -v "Triton autotuning\|UserWarning\|warn" "$OUT/bench_$m.log" | tail -8
done
if [ "${MQAR:-1}" = 1 ]; then
  timeout -s INT ${MQAR_TIMEOUT:-240} python -P -m hybridlab train "$ROOT/experiments/mqar.yaml" > "$OUT/mqar.log" 2>&1
  echo "mqar exit $?"; tail -14 "$OUT/mqar.log" | cut -c1-250
  for r in runs/mqar/*/ "$ROOT"/runs/mqar/*/ "$ROOT"/experiments/runs/mqar/*/; do
    n=$(basename "$r"); cp "$r/metrics.jsonl" "$OUT/mqar_$n.jsonl" 2>/dev/null
  done
fi
if [ "${SWEEP:-0}" = 1 ] && [ -d "$ROOT/.whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
  timeout ${SWEEP_TIMEOUT:-150} python -P -m hybridlab sweep "$ROOT/search_spaces/sal.yaml" \
      --timeout $(( ${SWEEP_TIMEOUT:-150} - 60 )) > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; tail -25 "$OUT/sweep.log"
fi
