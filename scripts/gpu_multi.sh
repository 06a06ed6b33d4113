#!/usr/bin/env bash
# Issue 20 on a host with several H200s (nvidia-h200-x2, -x4 or -x8). From the repository root,
# with the tree carried (and .whl/ from scripts/fetch_gpu_wheels.sh for the sweep part):
#   bash scripts/gpu_multi.sh OUT_DIR ddp     DDP scaling of taipan-190m, B8 L4096 per GPU:
#                                             1 GPU vs all, tokens/s per GPU; the first losses
#                                             of all GPUs vs 1 GPU at the same global batch
#   bash scripts/gpu_multi.sh OUT_DIR fsdp    taipan-1.3b with FSDP2 on all GPUs (tokens/s, peak
#                                             memory per GPU), its checkpoint resumed on half
#   bash scripts/gpu_multi.sh OUT_DIR sweep   a sweep with one trial per GPU (needs .whl/)
# Each part fits one call (600 s) on a cold machine. NVLink multicast stays off (the device
# tool's KINDS.md: a program using it can take the host's shared GPUs out of service).
set -u
OUT=${1:-/tmp/multi_out}
PART=${2:-ddp}
mkdir -p "$OUT"
source scripts/gpu_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_AUTOTUNING=1   # later processes (and ranks) reuse the first's tuned configs
N=$(python -c "import torch; print(torch.cuda.device_count())")
echo "$N GPUs; part $PART"
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cd /tmp
python -P -m hybridlab data prepare "$STDLIB" --out /tmp/prep --workers 16 2>&1 | tail -1
COMMON=(--runs-dir /tmp/runs --set "data={prepared: /tmp/prep}" --set seq_len=4096 --set micro_batch_size=8
        --set warmup_steps=2 --set eval_every=0 --set eval_batches=2 --set log_every=1)
TR="python -m torch.distributed.run --standalone"

train() {  # train NAME NPROC ARCH SECONDS [--set ...]: one torchrun, its metrics and a summary line
  local name=$1 nproc=$2 arch=$3 secs=$4
  shift 4
  timeout -s KILL "$secs" $TR --nproc_per_node "$nproc" -m hybridlab train "$ROOT/experiments/$arch" \
    --run-name "$name" "${COMMON[@]}" "$@" > "$OUT/train_$name.log" 2>&1
  cp /tmp/runs/$name/metrics.jsonl "$OUT/metrics_$name.jsonl" 2>/dev/null || { tail -5 "$OUT/train_$name.log"; return; }
  python - "$OUT/metrics_$name.jsonl" "$nproc" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/tokens_per_s" in l]
n, last = int(sys.argv[2]), rows[-4:]
tok = sum(r["train/tokens_per_s"] for r in last) / len(last)
peak = max(r.get("train/peak_memory_gib", 0) for r in rows)
print(f"{sys.argv[1]}: {n} GPU(s), {tok / 1e3:.1f}K tokens/s ({tok / n / 1e3:.1f}K per GPU) over the last "
      f"{len(last)} steps, peak {peak:.1f} GiB on rank 0, losses {[round(r['train/loss'], 4) for r in rows]}")
PY
}

case $PART in
ddp)
  train ddp-1 1 taipan-190m.yaml 300 --set batch_size=8 --set steps=10 --set checkpoint_every=0
  train ddp-$N "$N" taipan-190m.yaml 150 --set batch_size=$((8 * N)) --set steps=10 --set checkpoint_every=0
  # the same global batch on one GPU (N micro-batches accumulated): its losses are the reference
  train acc-1 1 taipan-190m.yaml 120 --set batch_size=$((8 * N)) --set steps=4 --set checkpoint_every=0
  ;;
fsdp)
  train fsdp-$N "$N" taipan-1.3b.yaml 330 --set parallel=fsdp --set batch_size=$((8 * N)) --set steps=8 \
    --set checkpoint_every=4
  half=$(( N / 2 > 0 ? N / 2 : 1 ))
  # resume the step-4 checkpoint on half the GPUs: Distributed Checkpoint reshards; steps 5-8 again
  rm -rf /tmp/runs/fsdp-r && cp -r /tmp/runs/fsdp-$N /tmp/runs/fsdp-r
  rm -rf /tmp/runs/fsdp-r/checkpoints/step_0000008 && echo step_0000004 > /tmp/runs/fsdp-r/checkpoints/latest
  timeout -s KILL 200 $TR --nproc_per_node "$half" -m hybridlab train --resume /tmp/runs/fsdp-r \
    > "$OUT/train_fsdp-r.log" 2>&1
  cp /tmp/runs/fsdp-r/metrics.jsonl "$OUT/metrics_fsdp-r.jsonl" 2>/dev/null
  python - "$OUT/metrics_fsdp-$N.jsonl" "$OUT/metrics_fsdp-r.jsonl" <<'PY'
import json, sys
def losses(p):
    out = {}
    for l in open(p):
        d = json.loads(l)
        if "train/loss" in d:
            out[d["step"]] = d["train/loss"]
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
for s in sorted(b):
    if s > 4:
        print(f"step {s}: on all GPUs {a.get(s)}, resumed on half {b[s]}")
PY
  ;;
sweep)
  python -m pip install -q --no-index --no-deps --target /tmp/site "$ROOT"/.whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
  timeout -s KILL 540 python -P -m hybridlab sweep "$ROOT/search_spaces/sal.yaml" --trials $((2 * N)) --timeout 300 \
    > "$OUT/sweep.log" 2>&1
  tail -25 "$OUT/sweep.log"
  ;;
esac
