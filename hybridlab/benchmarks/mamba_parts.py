"""Benchmark the Mamba-2 hot path's memory-bound parts: causal conv1d + SiLU and gated RMSNorm.

Triton kernels (`hybridlab.kernels.conv1d_triton`, `norm_triton`) beside the pure-torch
references, in the same process, bf16 on CUDA, `triton.testing.do_bench` medians.

    python -m hybridlab.benchmarks.mamba_parts [--json out.json]

Bandwidth is compulsory traffic over time: each (b, l, d) bf16 tensor read or written once
(weights and per-row statistics are negligible). Forward+backward counts the backward of
these kernels: conv1d reads x, dy and writes dx; gated RMSNorm reads x, z, dy and writes
dx, dz. "floor" is the share of the 4.25 TB/s device-to-device copy ceiling measured on the
H200 (the ceilings and every measured table: docs/measurements/README.md).
"""
from __future__ import annotations

import argparse
import json

import torch

PEAK_TBS = 4.25


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fwd_bwd(f, inputs, dy):
    def run():
        y = f()
        torch.autograd.grad(y, inputs, dy)

    return run


def _cases(dev="cuda", conv_shape=(8, 8192, 1792, 4), norm_shape=(8, 8192, 1536, 1536)):
    from hybridlab.kernels import conv1d_triton, norm_triton
    from hybridlab.kernels.conv1d import causal_conv1d_ref
    from hybridlab.kernels.norm import gated_rms_norm_ref

    dt = torch.bfloat16
    out = []

    # conv1d, B8 L8192 D1792 k4 (Mamba-2 d_model 768: x 1536 + B 128 + C 128 channels)
    b, l, d, k = conv_shape
    x = torch.randn(b, l, d, device=dev, dtype=dt, requires_grad=True)
    w = (0.5 * torch.randn(d, k, device=dev, dtype=dt)).requires_grad_()
    bias = (0.1 * torch.randn(d, device=dev, dtype=dt)).requires_grad_()
    dy = torch.randn(b, l, d, device=dev, dtype=dt)
    n = b * l * d * 2  # bytes of one tensor
    impls = {
        "triton": lambda: conv1d_triton.causal_conv1d(x, w, bias, activation="silu"),
        "torch_ref": lambda: causal_conv1d_ref(x, w, bias, activation="silu"),
    }
    shape = f"B{b} L{l} D{d} k{k}"
    out.append(("conv1d+silu", shape, "fwd", 2 * n, {k_: f for k_, f in impls.items()}))
    out.append(("conv1d+silu", shape, "fwd+bwd", 5 * n,
                {k_: _fwd_bwd(f, [x, w, bias], dy) for k_, f in impls.items()}))

    # gated RMSNorm, B8 L8192 d1536, one group, Mamba-2's norm_before_gate=False
    b, l, d, g = norm_shape
    xn = torch.randn(b, l, d, device=dev, dtype=dt, requires_grad=True)
    zn = torch.randn(b, l, d, device=dev, dtype=dt, requires_grad=True)
    wn = torch.ones(d, device=dev, dtype=dt, requires_grad=True)
    dyn = torch.randn(b, l, d, device=dev, dtype=dt)
    n = b * l * d * 2
    impls = {
        "triton": lambda: norm_triton.gated_rms_norm(xn, zn, wn, 1e-5, g, False),
        "torch_ref": lambda: gated_rms_norm_ref(xn, zn, wn, 1e-5, g, False),
    }
    shape = f"B{b} L{l} d{d} group{g}"
    out.append(("gated_rmsnorm", shape, "fwd", 3 * n, dict(impls)))
    out.append(("gated_rmsnorm", shape, "fwd+bwd", 8 * n,
                {k_: _fwd_bwd(f, [xn, zn, wn], dyn) for k_, f in impls.items()}))
    return out


def run(json_path=None) -> list[dict]:
    """Time every case; print a table; write JSON when json_path is given. Returns the rows."""
    if not torch.cuda.is_available():
        print("bench_mamba_parts: needs a CUDA device; nothing to do")
        return []
    rows = []
    for op, shape, mode, nbytes, impls in _cases():
        times = {name: _bench(fn) for name, fn in impls.items()}
        ref_ms = times["torch_ref"]
        for name, ms in times.items():
            tbs = nbytes / (ms * 1e-3) / 1e12
            rows.append({
                "op": op, "shape": shape, "mode": mode, "impl": name, "dtype": "bfloat16",
                "ms": round(ms, 4), "bytes": nbytes, "tb_s": round(tbs, 3),
                "speedup_vs_ref": round(ref_ms / ms, 2),
                "floor_share": round(tbs / PEAK_TBS, 3),
                "floor_ms": round(nbytes / (PEAK_TBS * 1e12) * 1e3, 4),
            })
        torch.cuda.empty_cache()
    _print(rows)
    _print_configs()
    if json_path:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tb_s": PEAK_TBS}
        try:
            import triton

            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


def _print(rows):
    hdr = f"{'op':<15}{'shape':<26}{'mode':<9}{'impl':<11}{'ms':>9}{'TB/s':>8}{'x ref':>8}{'floor':>8}{'floor ms':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['op']:<15}{r['shape']:<26}{r['mode']:<9}{r['impl']:<11}{r['ms']:>9.3f}{r['tb_s']:>8.2f}"
              f"{r['speedup_vs_ref']:>8.2f}{r['floor_share']:>8.0%}{r['floor_ms']:>10.3f}")


def _print_configs():
    from hybridlab.kernels import conv1d_triton, norm_triton

    for name, kern in [("conv fwd", conv1d_triton._conv_fwd_kernel), ("conv bwd dpre", conv1d_triton._conv_bwd_dpre_kernel),
                       ("conv bwd dx", conv1d_triton._conv_bwd_dx_kernel),
                       ("norm fwd", norm_triton._norm_fwd_kernel), ("norm bwd", norm_triton._norm_bwd_kernel)]:
        cache = getattr(kern, "cache", {})
        for key, cfg in cache.items():
            print(f"autotune {name}: {cfg}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows here")
    run(ap.parse_args().json)
