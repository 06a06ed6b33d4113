#!/usr/bin/env bash
# Issue 18 on the H200: taipan-190m on prepared data (byte-level, the GPU image's Python standard
# library as documents) with 0.5M-token steps, packed documents vs not, tokens/s from
# metrics.jsonl. Run from the repository root: bash scripts/gpu_pack.sh OUT_DIR
set -u
OUT=${1:-/tmp/pack_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -3
for pack in true false; do
  python -P -m hybridlab train "$ROOT/experiments/taipan-190m.yaml" --runs-dir /tmp/runs --run-name "pack-$pack" \
    --set "data={prepared: /tmp/prep}" --set seq_len=4096 --set tokens_per_step=524288 --set micro_batch_size=8 \
    --set batch_size=8 --set steps=8 --set warmup_steps=2 --set eval_every=0 --set eval_batches=2 \
    --set checkpoint_every=0 --set log_every=1 --set pack_documents=$pack 2>&1 | grep -v "^\s*$" | tail -3
  cp /tmp/runs/pack-$pack/metrics.jsonl "$OUT/metrics_pack_$pack.jsonl"
  python - "$OUT/metrics_pack_$pack.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/tokens_per_s" in l]
last = [r["train/tokens_per_s"] for r in rows[-4:]]
print(f"{sys.argv[1]}: steps {len(rows)}, tokens/s over the last 4 steps {sum(last) / len(last) / 1e3:.1f}K, "
      f"losses {[round(r['train/loss'], 3) for r in rows]}")
PY
done
