"""Benchmark: Triton selective attention vs torch SDPA (full causal) and flex_attention (window).

    python -m hybridlab.benchmarks.attention [--json out.json] [--quick]

On CUDA, q/k/v bf16 at B4 H12 D64 and L in {16384, 4096}; window 2048 and None (full causal);
a random selection of a share C in {0.05, 0.15, 0.3, 1.0} of the queries (C = 1.0 runs the
dense path, no q_mask; "1.0-mask" runs the masked path with every query selected; "0.15-kv"
is selected-only K/V mode, kv_mask = q_mask). Our timings include the mask -> index
compaction, the gather of q rows and the scatter of output rows (everything
`hybridlab.kernels.selective_attention` does, through its custom op, as a model calls it).
Baselines run in the same process on the same data: SDPA full causal, and `flex_attention`
(torch.compile'd) with a sliding-window block mask built once outside the timing. Times are
medians of `triton.testing.do_bench`, in ms. `run()` returns the rows.

Two timings of fwd+bwd: eager (each call issued by the host, as a benchmark loop or a
host-bound step sees it) and graph (the same fwd+bwd captured once in a CUDA graph and
replayed: GPU time alone, as inside a training step whose host runs ahead of the GPU).
"""
from __future__ import annotations

import argparse
import json
import platform


def _bench(fn, grad_to_none=None):
    import triton

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def graphed(fn):
    """fn captured in a CUDA graph after warm-up runs on a side stream (autotuning, compiles);
    returns the graph's replay."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def random_selection(b, L, capacity, device):
    """A (b, L) bool query mask selecting round(capacity * L) random positions per row."""
    import torch

    n = int(round(capacity * L))
    mask = torch.zeros(b, L, dtype=torch.bool, device=device)
    if n:
        mask.scatter_(1, torch.rand(b, L, device=device).topk(n, dim=1).indices, True)
    return mask


def run(json_path=None, shapes=None, capacities=None, windows=(2048, None)) -> list[dict]:
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA device; nothing measured")
        return []
    import triton
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from hybridlab.kernels import selective_attention

    shapes = shapes or [(4, 16384, 12, 64), (4, 4096, 12, 64)]
    # 0.15 first: the autotuner keys on (L, window, dense, kv_mask), so the masked configs are
    # tuned at the capacity we care about most
    capacities = capacities or ["0.15", "0.05", "0.3", "1.0", "1.0-mask", "0.15-kv"]
    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    dtype = torch.bfloat16
    rows: list[dict] = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version())

    def _save():
        if json_path:
            with open(json_path, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)

    for (B, L, H, D) in shapes:
        torch.manual_seed(0)
        # ours: the projections' layout (B, L, H, D); baselines: (B, H, L, D)
        q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        do = torch.randn(B, L, H, D, device=dev, dtype=dtype)
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        dot = do.transpose(1, 2).contiguous()

        def sdpa_f():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        sdpa = dict(fwd=_bench(sdpa_f),
                    fwdbwd=_bench(lambda: sdpa_f().backward(dot), grad_to_none=[qt, kt, vt]))
        print(f"B{B} L{L} H{H} D{D}: SDPA causal fwd {sdpa['fwd']:.3f} ms  fwd+bwd {sdpa['fwdbwd']:.3f} ms",
              flush=True)

        for window in windows:
            flex_t = None
            if window is not None:
                def sliding(b, h, q_idx, kv_idx, w=window):
                    return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

                block_mask = create_block_mask(sliding, B=None, H=None, Q_LEN=L, KV_LEN=L, device=dev)

                def flex_f():
                    return flex(qt, kt, vt, block_mask=block_mask)

                flex_t = dict(fwd=_bench(flex_f),
                              fwdbwd=_bench(lambda: flex_f().backward(dot), grad_to_none=[qt, kt, vt]),
                              graph=_bench(graphed(lambda: torch.autograd.grad(flex_f(), (qt, kt, vt), dot))))
                print(f"  window {window}: flex fwd {flex_t['fwd']:.3f} ms  fwd+bwd {flex_t['fwdbwd']:.3f} ms  "
                      f"graph {flex_t['graph']:.3f} ms", flush=True)
            base_name, base = ("flex", flex_t) if flex_t else ("sdpa", sdpa)

            for cap in capacities:
                c = float(cap.split("-")[0])
                if cap == "1.0":
                    q_mask = None  # dense path: every query, no index arrays
                else:
                    q_mask = random_selection(B, L, c, dev)
                kv_mask = q_mask if cap.endswith("-kv") else None

                def ours_f():
                    return selective_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=window)

                t_f = _bench(ours_f)
                t_fb = _bench(lambda: ours_f().backward(do), grad_to_none=[q, k, v])
                t_g = _bench(graphed(lambda: torch.autograd.grad(ours_f(), (q, k, v), do)))
                row = dict(B=B, L=L, H=H, D=D, window=window, capacity=cap,
                           ours_fwd_ms=t_f, ours_fwdbwd_ms=t_fb, ours_graph_ms=t_g,
                           flex_graph_ms=flex_t["graph"] if flex_t else None,
                           speedup_graph=flex_t["graph"] / t_g if flex_t else None,
                           sdpa_fwd_ms=sdpa["fwd"], sdpa_fwdbwd_ms=sdpa["fwdbwd"],
                           flex_fwd_ms=flex_t["fwd"] if flex_t else None,
                           flex_fwdbwd_ms=flex_t["fwdbwd"] if flex_t else None,
                           baseline=base_name,
                           speedup_fwd=base["fwd"] / t_f, speedup_fwdbwd=base["fwdbwd"] / t_fb)
                rows.append(row)
                print(f"    C={cap:<8} ours fwd {t_f:.3f} ms  fwd+bwd {t_fb:.3f} ms  graph {t_g:.3f} ms   "
                      f"{base_name}/ours fwd {row['speedup_fwd']:.2f}x  fwd+bwd {row['speedup_fwdbwd']:.2f}x",
                      flush=True)
                _save()
        del q, k, v, qt, kt, vt, do, dot
        torch.cuda.empty_cache()

    _print_table(rows)
    from hybridlab.kernels import selective_attention_triton as sat

    for name in ("_sel_attn_fwd", "_sel_attn_bwd_dq", "_sel_attn_bwd_dkdv"):
        for key, cfg in getattr(getattr(sat, name), "cache", {}).items():
            print(f"autotuned {name} {key[:5]}: {cfg}")
    _save()
    return rows


def _print_table(rows):
    if not rows:
        return
    head = (f"{'shape':<18}{'window':>7}{'C':>10}{'ours fwd':>10}{'ours f+b':>10}"
            f"{'flex fwd':>10}{'flex f+b':>10}{'sdpa fwd':>10}{'sdpa f+b':>10}{'base':>6}"
            f"{'x fwd':>8}{'x f+b':>8}{'ours grf':>10}{'flex grf':>10}{'x grf':>8}")
    print()
    print(head)
    print("-" * len(head))

    def f(x):
        return f"{x:10.3f}" if x is not None else f"{'-':>10}"

    for r in rows:
        shape = f"B{r['B']} L{r['L']} H{r['H']}"
        print(f"{shape:<18}{str(r['window']):>7}{r['capacity']:>10}{f(r['ours_fwd_ms'])}{f(r['ours_fwdbwd_ms'])}"
              f"{f(r['flex_fwd_ms'])}{f(r['flex_fwdbwd_ms'])}{f(r['sdpa_fwd_ms'])}{f(r['sdpa_fwdbwd_ms'])}"
              f"{r['baseline']:>6}{r['speedup_fwd']:8.2f}{r['speedup_fwdbwd']:8.2f}"
              f"{f(r.get('ours_graph_ms'))}{f(r.get('flex_graph_ms'))}"
              + (f"{r['speedup_graph']:8.2f}" if r.get("speedup_graph") else f"{'-':>8}"))
    print("x = baseline time / ours (baseline: flex sliding window when windowed, SDPA causal otherwise); "
          "f+b: fwd+bwd issued eagerly; grf: fwd+bwd replayed from a CUDA graph (GPU time)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--quick", action="store_true", help="only B4 L16384, window 2048")
    a = p.parse_args(argv)
    if a.quick:
        run(a.json, shapes=[(4, 16384, 12, 64)], windows=(2048,))
    else:
        run(a.json)


if __name__ == "__main__":
    main()
