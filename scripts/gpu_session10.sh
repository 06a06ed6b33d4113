#!/usr/bin/env bash
# Session 10 (2026-12-03) on the H200, one call: bash scripts/gpu_session10.sh OUT_DIR
#   1. GPU tests of what changed: the CE's fp32-epilogue grad W, the norm's out_dtype
#   2. taipan-190m training B8 L4096, eager and compiled (`bench model --compile`): MFU
#   3. issue 18: packed vs unpacked on prepared data, 0.5M-token steps, both compiled (the
#      default on CUDA since this session; eager pairs measured in this session's call 1)
set -u
OUT=${1:-/tmp/s10_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1   # later processes reuse the tuned configs
(HYBRIDLAB_AUTOTUNE=0 timeout 150 python -P -m pytest -q -p no:cacheprovider -m gpu \
   tests/test_cross_entropy_triton.py tests/test_conv1d_norm_triton.py -k "not conv1d" 2>&1 | tail -5;
 HYBRIDLAB_AUTOTUNE=0 timeout 60 python -P -m pytest -q -p no:cacheprovider \
   tests/test_conv1d_norm_triton.py -k "out_dtype or rms_norm" 2>&1 | tail -3) > "$OUT/tests.log" 2>&1
cat "$OUT/tests.log"
(cd /tmp; timeout 260 python -P -m hybridlab bench model "$ROOT/experiments/taipan-190m.yaml" --compile \
   --contexts 1K --no-anchors --steps 10 --json "$OUT/bench.json") > "$OUT/bench.log" 2>&1
grep -v "^\s*$" "$OUT/bench.log" | grep -iv "warn\|online softmax\|split the reduction\|important use case" | tail -8
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -1
for variant in "pack-true-compiled true" "pack-false-compiled false"; do
  set -- $variant
  timeout 170 python -P -m hybridlab train "$ROOT/experiments/taipan-190m.yaml" --runs-dir /tmp/runs --run-name "$1" \
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
