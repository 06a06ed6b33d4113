"""Issue 17's measurements in one process (H200): prefill at 131K, decoding at 128K context
against the cache-read floor, the selective attention at the training length, the SSD at
L2048 against L8192, with per-kernel tables where the time goes.

    source scripts/gpu_env.sh; cd /tmp; python -P $ROOT/scripts/gpu_speed.py [--sections a,b]
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

import torch
import triton.testing

ROOT = os.environ.get("ROOT", os.getcwd())
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from gpu_profile import kernel_table  # noqa: E402


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def env_section():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "transformers", "flash_attn"):
        try:
            m = importlib.import_module(mod)
            print(f"  {mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - report whatever is missing and why
            print(f"  {mod}: not importable ({type(e).__name__}: {str(e)[:80]})")


def _model(name):
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    return HybridLM(load_arch(f"{ROOT}/experiments/{name}.yaml")).cuda().eval()


def check_section():
    """Prefill in uneven chunks (the consecutive-cache path through the Triton kernels) and
    decoding equal the full forward, on small random models in fp32 at L 2048."""
    from hybridlab.graph import parse_arch
    from hybridlab.model import HybridLM

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for pattern, defaults in (("(M*2 S)*2", {"sal": {"window": 256, "capacity": 0.2}}),
                              ("(A F)*2", {}), ("(W F M)*2", {"swa": {"window": 300}})):
        arch = parse_arch({"name": "check", "d_model": 128, "vocab_size": 512, "pattern": pattern,
                           "defaults": defaults}, "check")
        torch.manual_seed(0)
        model = HybridLM(arch).cuda().eval()
        idx = torch.randint(0, 512, (2, 2048), device="cuda")
        with torch.no_grad():
            full = model(idx).logits
            caches = model.allocate_cache(2, 2048 + 8)
            parts, s = [], 0
            for T in (700, 1, 300, 1047):
                parts.append(model.prefill(idx[:, s:s + T], caches, all_logits=True))
                s += T
            chunked = torch.cat(parts, 1)
            caches = model.allocate_cache(2, 2048 + 8)
            one = model.prefill(idx[:, :2040], caches, all_logits=True)
            steps = torch.stack([model.step(idx[:, t], caches) for t in range(2040, 2048)], 1)
        print(f"{pattern}: chunked prefill vs forward {rel(chunked, full):.2e}, one pass {rel(one, full[:, :2040]):.2e}, "
              f"steps after it {rel(steps, full[:, 2040:]):.2e}", flush=True)


def prefill_section():
    """Prefill 131K tokens at batch 1: one pass (chunk from memory) vs the old 4096 chunks."""
    from hybridlab.benchmarks.inference import inference_cost

    for name in ("mamba2-190m", "taipan-190m", "transformerpp-190m"):
        model = _model(name)
        for chunk in (None, 4096):
            t0 = time.time()
            rows = inference_cost(model, [131072], device=torch.device("cuda"), amp=torch.bfloat16,
                                  chunk=chunk, cuda_graph=True, decode_steps=32)
            r = rows[0]
            if "stopped" in r:
                print(f"{name} chunk {chunk}: stopped ({r['stopped']})")
                continue
            print(f"{name} prefill 131072, chunk {chunk or model.prefill_chunk(1, 131072)}: "
                  f"{131072 / r['prefill_tokens_per_s']:.3f} s ({r['prefill_tokens_per_s'] / 1e3:.1f}K tok/s), "
                  f"decode {r['decode_ms_per_token']:.3f} ms/token, cache {r['cache_bytes'] / 1e9:.2f} GB, "
                  f"peak {r['peak_memory_bytes'] / 2**30:.1f} GiB ({time.time() - t0:.0f} s)", flush=True)
        idx = torch.randint(0, model.arch.vocab_size, (1, 131072), device="cuda")

        def one_pass():
            caches = model.allocate_cache(1, 131072 + 8)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model.prefill_prompt(idx, caches)
        kernel_table(one_pass, f"{name} prefill 131072 one pass", top=12)
        del model
        torch.cuda.empty_cache()


def decode_section():
    """transformerpp-190m decoding at 128K context: ms/token vs the cache-read floor."""
    from hybridlab.benchmarks.inference import inference_cost
    from hybridlab.decode import GraphedDecoder

    model = _model("transformerpp-190m")
    ctx = 131072
    for graph in (True, False):
        rows = inference_cost(model, [ctx], device=torch.device("cuda"), amp=torch.bfloat16,
                              cuda_graph=graph, decode_steps=64)
        r = rows[0]
        floor_ms = r["cache_bytes"] / 4.25e12 * 1e3
        print(f"transformerpp-190m decode at {ctx}, cuda_graph={graph}: {r['decode_ms_per_token']:.3f} ms/token; "
              f"cache {r['cache_bytes'] / 1e9:.2f} GB, read floor {floor_ms:.2f} ms "
              f"({r['decode_ms_per_token'] / floor_ms:.2f}x)", flush=True)
    caches = model.allocate_cache(1, ctx + 16)
    idx = torch.randint(0, model.arch.vocab_size, (1, ctx), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tok = model.prefill_prompt(idx, caches).argmax(-1)
        dec = GraphedDecoder(model, caches, 1)

        def step():
            for cache in caches:
                if hasattr(cache, "length"):
                    cache.length -= 1  # replaying the same position: keep the capacity check happy
            with torch.no_grad():
                model.step(tok, caches)
        kernel_table(step, "transformerpp-190m one eager decode step at 128K", top=10)
    del model, caches, dec
    torch.cuda.empty_cache()


def attention_section():
    """Selective attention B4 L4096 H12 D64 w2048 at C = 0.15 / 0.05 and B4 L16384, with flex."""
    from hybridlab.benchmarks import attention as ba

    rows = ba.run(shapes=[(4, 4096, 12, 64), (4, 16384, 12, 64)], capacities=["0.15", "0.05"], windows=(2048,))
    ba._print_table(rows)
    from hybridlab.kernels import selective_attention

    b, L, h, d = 4, 4096, 12, 64
    q, k, v = (torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = ba.random_selection(b, L, 0.15, "cuda")
    kernel_table(lambda: selective_attention(q, k, v, q_mask=mask, window=2048), "SAL fwd B4 L4096 C0.15")

    def fb():
        o = selective_attention(q, k, v, q_mask=mask, window=2048)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    kernel_table(fb, "SAL fwd+bwd B4 L4096 C0.15")


def host_section():
    """Where the host time of the selective attention at L4096 goes (CPU-side profile): the
    kernels take ~0.3 ms of a ~0.8 ms fwd+bwd there."""
    from hybridlab.benchmarks import attention as ba
    from hybridlab.kernels import selective_attention

    b, L, h, d = 4, 4096, 12, 64
    q, k, v = (torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = ba.random_selection(b, L, 0.15, "cuda")
    do = torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16)

    def fb():
        o = selective_attention(q, k, v, q_mask=mask, window=2048)
        torch.autograd.grad(o, (q, k, v), do)
    for _ in range(20):
        fb()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fb()
    t_host = (time.perf_counter() - t0) / 200
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / 200
    print(f"SAL fwd+bwd L4096: host {1e3 * t_host:.3f} ms per call to issue, {1e3 * t_all:.3f} ms with the GPU")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        fb()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def anchors_section():
    """transformerpp-190m beside transformers' Llama of the same size, same run: training at
    B8 L4096, prefill and decoding at 128K context."""
    from hybridlab.benchmarks.model import bench_model

    bench_model(f"{ROOT}/experiments/transformerpp-190m.yaml", batch=8, seq_len=4096, contexts="131072",
                steps=5, cuda_graph=True, anchors=True)


def train_section():
    """taipan-190m training at B8 L4096: tokens/s, MFU, memory, eager and compiled (bench model)."""
    from hybridlab.benchmarks.model import bench_model

    bench_model(f"{ROOT}/experiments/taipan-190m.yaml", batch=8, seq_len=4096, contexts="1K", steps=10,
                anchors=False, compile=True)


def ssd_section():
    """SSD fwd+bwd at B8 L2048 and L8192 through the public function (its custom op), issued
    eagerly and replayed from a CUDA graph (GPU time alone)."""
    from hybridlab.benchmarks.attention import graphed
    from hybridlab.benchmarks.ssd import inputs
    from hybridlab.kernels import ssd_chunked

    per_token = {}
    for b, l in ((8, 2048), (8, 8192)):
        x, dt, A, B, C, D, dt_bias = inputs(b, l, 24, 64, 128, 1)
        args = dict(chunk_size=256, D=D, dt_bias=dt_bias, dt_softplus=True)
        xs = [t.requires_grad_() for t in (x, dt, B, C)]
        dy = torch.randn_like(x)

        def fwd():
            return ssd_chunked(x, dt, A, B, C, **args)

        def fb():
            return torch.autograd.grad(fwd(), xs, dy)
        tf, tfb, tg = bench(fwd), bench(fb), bench(graphed(fb))
        per_token[l] = (tfb / (b * l), tg / (b * l))
        print(f"SSD B{b} L{l}: fwd {tf:.3f} ms, fwd+bwd {tfb:.3f} ms (graph {tg:.3f} ms), "
              f"fwd+bwd per 1M tokens {tfb / (b * l) * 1e6:.2f} ms (graph {tg / (b * l) * 1e6:.2f} ms)", flush=True)
        kernel_table(fb, f"SSD fwd+bwd B{b} L{l}")
    print(f"SSD per token, L2048 / L8192: eager {per_token[2048][0] / per_token[8192][0]:.2f}x, "
          f"graph {per_token[2048][1] / per_token[8192][1]:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="env,check,decode,prefill,attention,ssd")
    args = ap.parse_args()
    sections = {"env": env_section, "check": check_section, "host": host_section, "anchors": anchors_section, "train": train_section, "decode": decode_section, "prefill": prefill_section,
                "attention": attention_section, "ssd": ssd_section}
    for name in args.sections.split(","):
        t0 = time.time()
        print(f"\n===== {name} =====", flush=True)
        try:
            sections[name]()
        except Exception:  # noqa: BLE001 - one failing section must not cost the others
            traceback.print_exc()
        print(f"===== {name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
