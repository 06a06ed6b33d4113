# GPU call 2 (about 6 minutes): the model benchmark of taipan-190m, mamba2-190m and
# transformerpp-190m in one call (training B8 L4096; decode with CUDA graphs, 1K to 1M).
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
for m in taipan-190m mamba2-190m transformerpp-190m; do
  timeout ${MODEL_TIMEOUT:-110} python -P -m hybridlab bench model "$ROOT/experiments/$m.yaml" --batch 8 \
      --seq-len 4096 --steps 5 --contexts 1K,8K,32K,128K,1M --time-budget 30 --cuda-graph \
      --json "$OUT/bench_$m.json" > "$OUT/bench_$m.log" 2>&1
  echo "$m exit $?"; tail -9 "$OUT/bench_$m.log"
done
