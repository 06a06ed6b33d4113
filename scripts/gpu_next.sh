#!/usr/bin/env bash
# The H200 runs left open at the end of session 11 (2026-12-03), in one call. From the repository
# root, with the tree carried (e.g. as a snapshot): bash scripts/gpu_next.sh "$OUT"
# Issue 18: taipan-190m on prepared data, 0.5M-token steps, compiled (the default on CUDA),
# unpacked / packed / unpacked again: every packed run so far was the first of its call, right
# after the data preparation, so an order effect is not ruled out (criterion: within 5%; -7.3%
# and -8.7% in session 11). Then both under scripts/train_profile.py: the GPU's idle share of a
# step and the host's waits, which the model-only profile (+2% for packed) does not see.
# `timeout -s KILL`: training takes SIGTERM as "save and stop at the next step", which never
# comes while it compiles; the first run pays autotuning and compilation on a cold machine.
set -u
OUT=${1:-/tmp/next_out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export TRITON_CACHE_AUTOTUNING=1   # later runs reuse the first's tuned configs
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -1
COMMON=(--set "data={prepared: /tmp/prep}" --set seq_len=4096 --set tokens_per_step=524288
        --set micro_batch_size=8 --set batch_size=8 --set warmup_steps=2 --set eval_every=0
        --set eval_batches=2 --set checkpoint_every=0 --set log_every=1)
for variant in "unpacked-1 false 330" "packed true 200" "unpacked-2 false 200"; do
  set -- $variant
  timeout -s KILL "$3" python -P -m hybridlab train "$ROOT/experiments/taipan-190m.yaml" --runs-dir /tmp/runs \
    --run-name "$1" "${COMMON[@]}" --set steps=8 --set pack_documents=$2 > "$OUT/train_$1.log" 2>&1
  cp /tmp/runs/$1/metrics.jsonl "$OUT/metrics_$1.jsonl" || continue
  python "$ROOT/scripts/tokens_per_s.py" "$OUT/metrics_$1.jsonl"
done
for pack in true false; do
  timeout -s KILL 120 python -P "$ROOT/scripts/train_profile.py" "$ROOT/experiments/taipan-190m.yaml" \
    --skip 3 --active 2 "${COMMON[@]}" --set runs_dir=/tmp/runs_profile --set pack_documents=$pack \
    > "$OUT/train_profile_pack-$pack.log" 2>&1
  grep -E "profiled steps|GPU kernels|  host " "$OUT/train_profile_pack-$pack.log"
done
