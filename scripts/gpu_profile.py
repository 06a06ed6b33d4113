"""Where the GPU time goes: per-kernel CUDA times (torch.profiler) for the SSD scan and the
selective attention at the issue shapes, plus A/B timings of kernel variants.

    source scripts/gpu_env.sh; cd /tmp; python -P $ROOT/scripts/gpu_profile.py [--old PATH] [--decode]

`--old PATH` times another copy of ssd_triton.py (e.g. the previous commit's) beside the current
one in the same process, `--attn NAME=PATH` (repeatable) the same for selective_attention_triton.py; `--decode` also times CUDA-graph decoding of the 190M models.
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
    """Another copy of a kernels module, imported inside hybridlab.kernels (its relative imports)."""
    import hybridlab.kernels  # noqa: F401
    name = f"hybridlab.kernels.{name}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ssd_section(old_path):
    from hybridlab.kernels import ssd_triton as new
    from hybridlab.benchmarks.ssd import inputs

    b, l, h, p, n, g, q = 8, 8192, 24, 64, 128, 1, 256
    t = inputs(b, l, h, p, n, g)
    leaves = [x.detach().clone().requires_grad_() if i != 2 else x for i, x in enumerate(t)]
    x, dt, A, B, C, D, dt_bias = leaves
    dy = torch.randn_like(x)
    mods = {"new": new}
    if old_path and os.path.exists(old_path):
        mods["old"] = load_module(old_path, "ssd_triton_old")

    def fwd(m):
        return lambda: m.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)

    def fwdbwd(m):
        def f():  # autograd.grad: no accumulation into .grad, as in the benchmark
            y = m.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)
            torch.autograd.grad(y, (x, dt, B, C, D, dt_bias), dy)
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
    for kname in ("_chunk_state_fwd", "_chunk_scan_fwd", "_bwd_dx_db", "_bwd_dc"):
        cfg = getattr(getattr(new, kname), "best_config", None)
        print(f"  autotuned {kname}: {cfg}")
    kernel_table(fwd(new), "SSD fwd kernels (new)")
    kernel_table(fwdbwd(new), "SSD fwd+bwd kernels (new)")
    if "old" in mods:
        kernel_table(fwdbwd(mods["old"]), "SSD fwd+bwd kernels (old)")


def _autotune_report(mod, names=("_sel_attn_fwd", "_sel_attn_bwd_dq", "_sel_attn_bwd_dkdv")):
    """Each autotuned kernel's timing of every config it tried (Autotuner.configs_timings, the
    last tuning key), best first."""
    for kname in names:
        tuner = getattr(mod, kname)
        timings = getattr(tuner, "configs_timings", None) or {}
        print(f"  {kname}: best {getattr(tuner, 'best_config', None)}")
        for cfg, t in sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], (list, tuple)) else kv[1]):
            t0 = t[0] if isinstance(t, (list, tuple)) else t
            kw = cfg.kwargs
            extra = f" cap{cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else ""
            print(f"      {kw.get('BLOCK_M')}x{kw.get('BLOCK_N')} w{cfg.num_warps} s{cfg.num_stages}{extra}: {t0:.4f} ms")


def attention_section(variants=None):
    """C = 0.15 at the issue shape: ours (and other copies of the kernels module, A/B in one
    process: `variants` maps a name to a path) beside flex_attention's sliding window, all
    measured here; each variant's autotuner timings of every config."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from hybridlab.benchmarks.attention import random_selection
    from hybridlab.kernels import selective_attention_triton as sat

    b, L, H, d, w = 4, 16384, 12, 64, 2048
    q, k, v = (torch.randn(b, L, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    mods = {"new": sat}
    for name, path in (variants or {}).items():
        if os.path.exists(path):
            mods[name] = load_module(path, f"sat_{name}")
    flex = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(lambda b_, h_, qi, ki: (qi >= ki) & (qi - ki < w), None, None, L, L, device="cuda")
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    flex_f = bench(lambda: flex(qt, kt, vt, block_mask=bm))
    flex_fb = bench(lambda: torch.autograd.grad(flex(qt, kt, vt, block_mask=bm), (qt, kt, vt), dot))
    print(f"\nflex_attention window {w}: fwd {flex_f:.3f} ms, fwd+bwd {flex_fb:.3f} ms", flush=True)
    mask = random_selection(b, L, 0.15, "cuda")
    outs = {}
    for name, m in mods.items():
        def fwd(m=m):
            return m.selective_attention(q, k, v, q_mask=mask, window=w)

        def fwdbwd(fwd=fwd):
            return torch.autograd.grad(fwd(), (q, k, v), do)

        t0 = time.time()
        outs[name] = (fwd().float(), *(g.float() for g in fwdbwd()))
        tune_s = time.time() - t0
        f_ms, fb_ms = bench(fwd), bench(fwdbwd)
        print(f"\nselective attention [{name}] B{b} L{L} H{H} D{d} w{w} C0.15: fwd {f_ms:.3f} ms "
              f"({flex_f / f_ms:.2f}x flex), fwd+bwd {fb_ms:.3f} ms ({flex_fb / fb_ms:.2f}x flex)"
              f"  [first call incl. autotuning {tune_s:.0f} s]", flush=True)
        _autotune_report(m)
        kernel_table(fwdbwd, f"  [{name}] fwd+bwd kernels")
        if name != "new":
            errs = [((a - b_).norm() / b_.norm()).item() for a, b_ in zip(outs[name], outs["new"])]
            print(f"  {name} vs new rel diff (o, dq, dk, dv):", " ".join(f"{e:.2e}" for e in errs))
    # against the fp32 reference on one head group, to catch a wrong kernel outright
    from hybridlab.kernels.selective_attention import selective_attention_ref
    ref = selective_attention_ref(q[:1, :4096].float(), k[:1, :4096].float(), v[:1, :4096].float(),
                                  q_mask=mask[:1, :4096], window=w)
    for name, m in mods.items():
        got = m.selective_attention(q[:1, :4096], k[:1, :4096], v[:1, :4096], q_mask=mask[:1, :4096], window=w)
        print(f"  [{name}] vs fp32 reference (B1 L4096): rel err {((got.float() - ref).norm() / ref.norm()).item():.2e}")


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
    """conv1d + SiLU forward and forward+backward, on a contiguous input and on Mamba-2's
    strided xBC slice of the in-proj output: the row-streaming kernels against the tiled ones."""
    from hybridlab.kernels import conv1d_triton as ct

    b, l, d, k = 8, 8192, 1792, 4
    w = torch.randn(d, k, device="cuda", requires_grad=True)
    bias = torch.randn(d, device="cuda", requires_grad=True)
    dy = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)
    for layout in ("contiguous", "strided"):
        if layout == "contiguous":
            x = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        else:
            x = torch.randn(b, l, 3352, device="cuda", dtype=torch.bfloat16)[:, :, 768:768 + d].requires_grad_()

        def fb():
            return torch.autograd.grad(ct.causal_conv1d(x, w, bias), (x, w, bias), dy)

        out = {}
        for rows in (True, False):
            with ct.row_kernels(rows), torch.no_grad():
                f = bench(lambda: ct.causal_conv1d(x, w, bias))
            with ct.row_kernels(rows):
                out[rows] = (f, bench(fb), [t.float() for t in fb()])
            print(f"conv1d B{b} L{l} D{d} k{k} {layout} {'rows ' if rows else 'tiles'}: fwd {f:.3f} ms, "
                  f"fwd+bwd {out[rows][1]:.3f} ms")
        diff = max(((a - c).norm() / c.norm()).item() for a, c in zip(out[True][2], out[False][2]))
        print(f"  rows vs tiles: fwd {out[False][0] / out[True][0]:.2f}x, fwd+bwd "
              f"{out[False][1] / out[True][1]:.2f}x faster; gradients agree to {diff:.1e} (relative)")


def ce_section():
    """LM head + cross-entropy at a 190M model's head (B8 L4096 tokens, d 768, vocab 128256)."""
    from hybridlab.kernels import cross_entropy as ce

    n, d, v = 32768, 768, 128256
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    for name, backend in (("torch chunked", "reference"), ("fused", "triton")):
        def fb():
            return torch.autograd.grad(ce.linear_cross_entropy(h, w, t, chunk=8192), (h, w))
        torch.cuda.reset_peak_memory_stats()
        os.environ["HYBRIDLAB_KERNELS"] = backend  # read at every call (kernels/dispatch.py)
        try:
            ms = bench(fb)
        finally:
            del os.environ["HYBRIDLAB_KERNELS"]
        print(f"LM head + CE N{n} d{d} V{v} {name}: fwd+bwd {ms:.2f} ms, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def train_section():
    """Per-kernel time of one training step (fwd + bwd + AdamW) of the 190M models."""
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    for name in ("taipan-190m",):
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
    from hybridlab.benchmarks.inference import inference_cost, inference_table
    from hybridlab.decode import GraphedDecoder, restore_caches, snapshot_caches
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    for name in ("mamba2-190m", "taipan-190m"):
        arch = load_arch(f"{ROOT}/experiments/{name}.yaml")
        model = HybridLM(arch).cuda()
        t0 = time.time()
        rows = inference_cost(model, [1024, 8192, 32768], device=torch.device("cuda"),
                              amp=torch.bfloat16, cuda_graph=True, decode_steps=64, time_budget_s=40)
        print(f"\n{name} decode with CUDA graphs ({time.time() - t0:.0f} s)")
        print("\n".join(inference_table(rows)))
        # the graphed decoder must produce the same tokens as eager stepping
        caches = model.allocate_cache(1, 600)
        idx = torch.randint(0, arch.vocab_size, (1, 512), device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.prefill(idx, caches)
            snap = snapshot_caches(caches)
            tok = logits.argmax(-1)
            eager = []
            for _ in range(8):
                tok = model.step(tok, caches).argmax(-1)
                eager.append(tok.item())
            restore_caches(caches, snap)
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
    ap.add_argument("--old", help="another copy of ssd_triton.py to A/B against")
    ap.add_argument("--attn", action="append", default=[], metavar="NAME=PATH",
                    help="another copy of selective_attention_triton.py to A/B against (repeatable)")
    ap.add_argument("--sections", default="ssd,attention,conv,ce,block,train,decode")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    sections = {"ssd": lambda: ssd_section(args.old), "attention": lambda: attention_section(dict(a.split("=", 1) for a in args.attn)),
                "conv": conv_section, "ce": ce_section, "block": block_section, "train": train_section,
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
