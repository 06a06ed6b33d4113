# Issue 18 on one GPU (NCCL, bf16): torchrun DDP and FSDP2 of a small model, a resume from the
# sharded checkpoint, and the CUDA micro-batch probe under a memory cap. From the repository root:
#   bash scripts/gpu_distributed/run.sh
ROOT=$(pwd); source scripts/gpu_env.sh; cd /tmp
B=$ROOT/scripts/gpu_distributed
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'
TR="timeout 100 python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29500"
$TR -m hybridlab train $B/arch.yaml --run-name ddp 2>&1 | grep -v Warn
$TR -m hybridlab train $B/arch.yaml --run-name fsdp --set parallel=fsdp 2>&1 | grep -v Warn
cp -r /tmp/gr/fsdp /tmp/gr/fsdp-r; rm -rf /tmp/gr/fsdp-r/checkpoints/step_0000006; echo step_0000003 > /tmp/gr/fsdp-r/checkpoints/latest
timeout 60 python3 -m hybridlab train --resume /tmp/gr/fsdp-r 2>&1 | tail -3
python3 - <<'P'
import json
def m(r):
    out = {}
    for l in open(f"/tmp/gr/{r}/metrics.jsonl"):
        d = json.loads(l); out.setdefault(d["step"], {}).update(d)
    return out
runs = {r: m(r) for r in ("ddp", "fsdp", "fsdp-r")}
for s in range(1, 7):
    print(s, " ".join(f"{r}={runs[r][s]['train/loss']:.5f}" for r in runs if s in runs[r]))
P
timeout 60 python3 $B/probe.py $B/arch.yaml
