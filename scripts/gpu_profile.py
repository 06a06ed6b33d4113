"""Where the GPU time goes: per-kernel CUDA times (torch.profiler) for the SSD scan and the
selective attention at the issue shapes, plus A/B timings of kernel variants.

    source scripts/gpu_env.sh; cd /tmp; python -P $ROOT/scripts/gpu_profile.py [--old PATH] [--decode]

`--old PATH` times another copy of ssd_triton.py (e.g. the previous commit's) beside the current
one in the same process; `--decode` also times CUDA-graph decoding of the 190M models.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback

import torch
import triton.testing

ROOT = os.environ.get("ROOT", os.getcwd())


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_table(fn, title, top=14):
    """Run fn under the profiler (after a warm-up) and print CUDA time per kernel name."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)
            rows.setdefault(e.name, [0.0, 0])
            rows[e.name][0] += t / 5 / 1e3
            rows[e.name][1] += 1
    total = sum(v[0] for v in rows.values())
    print(f"\n{title}: {total:.3f} ms of kernels per call")
    for name, (ms, cnt) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.3f} ms  x{cnt // 5:<3d} {name[:90]}")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ssd_section(old_path):
    from hybridlab.kernels import ssd_triton as new
    from hybridlab.benchmarks.ssd import _inputs

    b, l, h, p, n, g, q = 8, 8192, 24, 64, 128, 1, 256
    t = _inputs(b, l, h, p, n, g)
    leaves = [x.detach().clone().requires_grad_() if i != 2 else x for i, x in enumerate(t)]
    x, dt, A, B, C, D, dt_bias = leaves
    dy = torch.randn_like(x)
    mods = {"new": new}
    if old_path and os.path.exists(old_path):
        mods["old"] = load_module(old_path, "ssd_triton_old")

    def fwd(m):
        return lambda: m.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)

    def fwdbwd(m):
        def f():
            y = m.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)
            y.backward(dy)
        return f

    print(f"SSD B{b} L{l} H{h} P{p} N{n} chunk {q}, bf16")
    ref = {}
    for name, m in mods.items():
        y = m.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)
        y.backward(dy)
        ref[name] = (y.detach().float(), *(a.grad.detach().float().clone() for a in (x, dt, B, C)))
        for a in (x, dt, B, C, D, dt_bias):
            a.grad = None
    if "old" in ref:
        errs = [((a - b_).norm() / b_.norm()).item() for a, b_ in zip(ref["new"], ref["old"])]
        print("  new vs old rel diff (y, dx, ddt, dB, dC):", " ".join(f"{e:.2e}" for e in errs))
    for name, m in mods.items():
        f_ms = bench(fwd(m))
        fb_ms = bench(fwdbwd(m))
        print(f"  {name}: fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms")
    for target in (1, 2048, 4096):
        new._SPLIT_TARGET = target
        print(f"  new, split target {target}: fwd+bwd {bench(fwdbwd(new)):.3f} ms")
    new._SPLIT_TARGET = 1024
    kernel_table(fwd(new), "SSD fwd kernels (new)")
    kernel_table(fwdbwd(new), "SSD fwd+bwd kernels (new)")
    if "old" in mods:
        kernel_table(fwdbwd(mods["old"]), "SSD fwd+bwd kernels (old)")


def attention_section():
    from hybridlab.benchmarks.attention import _selection
    from hybridlab.kernels import selective_attention_triton as sat

    b, L, H, d, w = 4, 16384, 12, 64, 2048
    q, k, v = (torch.randn(b, L, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    for cap in (0.15,):
        mask = _selection(b, L, cap, "cuda")

        def fwd():
            return sat.selective_attention(q, k, v, q_mask=mask, window=w)

        def fwdbwd():
            fwd().backward(do)

        print(f"\nselective attention B{b} L{L} H{H} D{d} w{w} C{cap}: fwd {bench(fwd):.3f} ms, "
              f"fwd+bwd {bench(fwdbwd):.3f} ms")
        kernel_table(fwd, "  attention fwd kernels")
        kernel_table(fwdbwd, "  attention fwd+bwd kernels")


def block_section():
    from hybridlab.benchmarks import mamba2_block, mamba_parts
    from hybridlab.blocks import REGISTRY

    mamba2_block.run()
    mamba_parts.run()
    cfg = REGISTRY["mamba2"].config_cls.from_dict({"d_state": 128, "headdim": 64, "chunk_size": 256}, 768)
    block = REGISTRY["mamba2"].module_cls(cfg, 768, 24).cuda()
    h = torch.randn(8, 8192, 768, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(h)
        y.backward(torch.ones_like(y))

    kernel_table(step, "mamba2 block fwd+bwd B8 L8192 d768", top=25)


def conv_section():
    """conv1d + SiLU backward implementations side by side (module switch _BWD_IMPL)."""
    from hybridlab.kernels import conv1d_triton as ct

    b, l, d, k = 8, 8192, 1792, 4
    x = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, k, device="cuda", requires_grad=True)
    bias = torch.randn(d, device="cuda", requires_grad=True)
    dy = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for impl in ("v1", "v2"):
        if not hasattr(ct, "_BWD_IMPL"):
            break
        ct._BWD_IMPL = impl

        def fb():
            y = ct.causal_conv1d(x, w, bias)
            return torch.autograd.grad(y, (x, w, bias), dy)

        grads[impl] = fb()
        print(f"conv1d B{b} L{l} D{d} k{k} bwd {impl}: fwd+bwd {bench(fb):.3f} ms")
    if len(grads) == 2:
        print("  v2 vs v1 rel diff (dx, dw, db):", " ".join(
            f"{((a.float() - c.float()).norm() / c.float().norm()).item():.2e}" for a, c in zip(grads["v2"], grads["v1"])))


def train_section():
    """Per-kernel time of one training step (fwd + bwd + AdamW) of the 190M models."""
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    for name in ("taipan-190m", "mamba2-190m"):
        model = HybridLM(load_arch(f"{ROOT}/experiments/{name}.yaml")).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        idx = torch.randint(0, model.arch.vocab_size, (8, 4097), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:], return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 3 * 1e3
        print(f"\n{name} train step B8 L4096: {ms:.1f} ms wall, {8 * 4096 / ms:.1f}K tokens/s")
        kernel_table(step, f"{name} train step kernels", top=30)
        del model, opt
        torch.cuda.empty_cache()


def decode_section():
    from hybridlab.evaluate import inference_cost, inference_table
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    for name in ("mamba2-190m", "taipan-190m"):
        arch = load_arch(f"{ROOT}/experiments/{name}.yaml")
        model = HybridLM(arch).cuda()
        for graph in (False, True):
            t0 = time.time()
            rows = inference_cost(model, [1024, 8192, 65536], device=torch.device("cuda"),
                                  amp=torch.bfloat16, cuda_graph=graph, decode_steps=32, time_budget_s=60)
            print(f"\n{name} decode, cuda_graph={graph} ({time.time() - t0:.0f} s)")
            print("\n".join(inference_table(rows)))
        # the graphed decoder must produce the same tokens as eager stepping
        caches = model.allocate_cache(1, 600)
        idx = torch.randint(0, arch.vocab_size, (1, 512), device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.prefill(idx, caches)
            snap = [({kk: vv.clone() for kk, vv in c.items()}, getattr(c, "length", None)) for c in caches]
            tok = logits.argmax(-1)
            eager = []
            for _ in range(8):
                tok = model.step(tok, caches).argmax(-1)
                eager.append(tok.item())
            from hybridlab.decode import GraphedDecoder, _restore
            _restore(caches, snap)
            dec = GraphedDecoder(model, caches, 1)
            tok = logits.argmax(-1)
            graphed = []
            for _ in range(8):
                tok = dec(tok).argmax(-1)
                graphed.append(tok.item())
        print(f"{name}: eager tokens {eager}\n{name}: graph tokens {graphed}  same={eager == graphed}")
        del model
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old")
    ap.add_argument("--sections", default="ssd,attention,conv,block,train,decode")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    sections = {"ssd": lambda: ssd_section(args.old), "attention": attention_section,
                "conv": conv_section, "block": block_section, "train": train_section,
                "decode": decode_section}
    for s in args.sections.split(","):
        t0 = time.time()
        try:
            sections[s]()
        except Exception:
            traceback.print_exc()
        print(f"[{s}: {time.time() - t0:.0f} s]", flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
