#!/usr/bin/env bash
# Session 10's second H200 call: issue 18's packed vs unpacked (0.5M-token steps, compiled, the
# default) after the data loader change (next batch drawn on a thread, seq_idx per row).
#   bash scripts/gpu_session10b.sh OUT_DIR
set -u
OUT=${1:-/tmp/s10b_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -1
for variant in "pack-true-compiled true" "pack-false-compiled false"; do
  set -- $variant
  timeout 150 python -P -m hybridlab train "$ROOT/experiments/taipan-190m.yaml" --runs-dir /tmp/runs --run-name "$1" \
    --set "data={prepared: /tmp/prep}" --set seq_len=4096 --set tokens_per_step=524288 --set micro_batch_size=8 \
    --set batch_size=8 --set steps=8 --set warmup_steps=2 --set eval_every=0 --set eval_batches=2 \
    --set checkpoint_every=0 --set log_every=1 --set pack_documents=$2 > "$OUT/train_$1.log" 2>&1
  cp /tmp/runs/$1/metrics.jsonl "$OUT/metrics_$1.jsonl"
  python - "$OUT/metrics_$1.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/tokens_per_s" in l]
last = [r["train/tokens_per_s"] for r in rows[-4:]]
print(f"{sys.argv[1]}: steps {len(rows)}, tokens/s over the last 4 steps {sum(last) / len(last) / 1e3:.1f}K, "
      f"losses {[round(r['train/loss'], 3) for r in rows]}")
PY
done
