# GPU call (about 9 minutes): the model benchmark of taipan-190m, mamba2-190m and
# transformerpp-190m in one call (training B8 L4096; decode with CUDA graphs), then the MQAR
# suite and a time-boxed GPU-scale run of the SAL sweep. Needs `carry: [".whl"]` for optuna
# (scripts/fetch_gpu_wheels.sh). Logs, JSON and reports land in $OUT.
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
for m in taipan-190m mamba2-190m transformerpp-190m; do
  timeout ${MODEL_TIMEOUT:-100} python -P -m hybridlab bench model "$ROOT/experiments/$m.yaml" --batch 8 \
      --seq-len 4096 --steps 5 --contexts ${CONTEXTS:-1K,8K,32K,128K,1M} --time-budget 25 --cuda-graph \
      --json "$OUT/bench_$m.json" > "$OUT/bench_$m.log" 2>&1
  echo "$m exit $?"; tail -9 "$OUT/bench_$m.log"
done
timeout ${MQAR_TIMEOUT:-200} python -P -m hybridlab train "$ROOT/experiments/mqar.yaml" > "$OUT/mqar.log" 2>&1
echo "mqar exit $?"; tail -12 "$OUT/mqar.log"
if [ -d "$ROOT/.whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
  timeout ${SWEEP_TIMEOUT:-150} python -P -m hybridlab sweep "$ROOT/search_spaces/sal.yaml" \
      --timeout $(( ${SWEEP_TIMEOUT:-150} - 50 )) > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?"; tail -25 "$OUT/sweep.log"
fi
