"""Issue 18 on the H200: where packed training loses time. taipan-190m, one micro-batch of
B8 L4096 in bf16, forward + backward: without seq_idx, with seq_idx of one document per row
(the packed kernels' paths with nothing to cut) and with the documents of the standard-library
prepared data (a boundary in about a quarter of the rows), per-kernel GPU time for each.
`--compile`: the model through torch.compile (as `compile: true` trains it). `--prepared DIR`:
instead, a micro-batch drawn packed from prepared data (its real document boundaries), with and
without its seq_idx. `--only NAME`: that case alone (e.g. "no seq_idx": the training step as
unpacked runs it); `--top N`: kernels listed per case (30).

    source scripts/gpu_env.sh; cd /tmp
    python -P $ROOT/scripts/gpu_pack_profile.py [--compile] [--prepared DIR] [--only NAME] [--top N]
"""
from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.environ.get("ROOT", os.getcwd())
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gpu_profile import kernel_table  # noqa: E402


def main():
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    torch.manual_seed(0)
    arch = load_arch(f"{ROOT}/experiments/taipan-190m.yaml")
    model = HybridLM(arch).cuda()
    forward = torch.compile(model) if "--compile" in sys.argv else model
    B, L = 8, 4096
    idx = torch.randint(0, arch.vocab_size, (B, L + 1), device="cuda")
    one_doc = torch.zeros(B, L, dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(0)
    cuts = torch.randint(1, L, (B,), generator=g)
    some = torch.rand(B, generator=g) < 0.25
    docs = (torch.arange(L)[None] >= cuts[:, None]) & some[:, None]
    docs = docs.to(torch.int32).cuda()

    x, y = idx[:, :-1], idx[:, 1:]
    cases = {"no seq_idx": (x, y, None), "seq_idx, one document a row": (x, y, one_doc),
             "seq_idx, stdlib-like cuts": (x, y, docs)}
    if "--prepared" in sys.argv:
        from hybridlab.data import make_dataset
        ds = make_dataset({"prepared": sys.argv[sys.argv.index("--prepared") + 1]}, L)
        inputs, targets, seq = (t[:B].cuda() for t in ds.train_batch_packed(1, B, 0))
        starts = (seq[:, 1:] != seq[:, :-1]).sum().item() + B
        chunks = seq.view(B, -1, 256)                                               # the SSD's chunks
        mixed = (chunks[..., 0] != chunks[..., -1]).float().mean().item()
        print(f"prepared micro-batch: {starts} documents over {B} rows; {mixed:.0%} of the "
              f"256-token chunks hold a document start")
        cases = {"prepared rows, no seq_idx": (inputs, targets, None), "prepared rows, packed": (inputs, targets, seq)}

    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1]
        cases = {only: cases[only]}
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 30

    def step(case):
        inputs, targets, seq_idx = case

        def fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = forward(inputs, targets, return_logits=False, step=0, seq_idx=seq_idx)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        return fn

    def timed(fn, n=8):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    t0 = time.time()
    for name, seq in cases.items():
        fn = step(seq)
        fn()  # autotuning and compiles for this case's kernel variants
        torch.cuda.synchronize()
        print(f"[{time.time() - t0:.0f} s] {name}: warmed up", flush=True)
    for name, seq in cases.items():  # timed once every case is warm, twice each
        for _ in range(2):
            ms = timed(step(seq))
            print(f"{name}: fwd+bwd {ms:.2f} ms ({B * L / ms:.1f}K tokens/s)", flush=True)
    for name, seq in cases.items():
        kernel_table(step(seq), name, top=top)


if __name__ == "__main__":
    main()
