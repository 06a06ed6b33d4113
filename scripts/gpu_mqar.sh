# GPU call 3: the MQAR suite (taipan-tiny vs mamba2-tiny), its comparison table and metrics.
source scripts/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cd /tmp
timeout ${MQAR_TIMEOUT:-560} python -P -m hybridlab train "$ROOT/experiments/mqar.yaml" > "$OUT/mqar.log" 2>&1
echo "mqar exit $?"; tail -8 "$OUT/mqar.log"
for r in runs/mqar/*/; do n=$(basename "$r"); cp "$r/metrics.jsonl" "$OUT/mqar_$n.jsonl" 2>/dev/null; done
