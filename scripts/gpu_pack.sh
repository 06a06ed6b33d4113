#!/usr/bin/env bash
# Issue 18 on the H200: taipan-190m on prepared data (byte-level, the GPU image's Python standard
# library as documents) with 0.5M-token steps, packed documents vs not, tokens/s from
# metrics.jsonl; and packed through `compile: true`. Run from the repository root:
#   bash scripts/gpu_pack.sh OUT_DIR
set -u
OUT=${1:-/tmp/pack_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -3
# name, pack_documents, compile
for variant in "pack-true true false" "pack-false false false" "pack-true-compiled true true"; do
  set -- $variant
  python -P -m hybridlab train "$ROOT/experiments/taipan-190m.yaml" --runs-dir /tmp/runs --run-name "$1" \
    --set "data={prepared: /tmp/prep}" --set seq_len=4096 --set tokens_per_step=524288 --set micro_batch_size=8 \
    --set batch_size=8 --set steps=8 --set warmup_steps=2 --set eval_every=0 --set eval_batches=2 \
    --set checkpoint_every=0 --set log_every=1 --set pack_documents=$2 --set compile=$3 2>&1 | grep -v "^\s*$" | tail -3
  cp /tmp/runs/$1/metrics.jsonl "$OUT/metrics_$1.jsonl"
  python "$ROOT/scripts/tokens_per_s.py" "$OUT/metrics_$1.jsonl"
done
