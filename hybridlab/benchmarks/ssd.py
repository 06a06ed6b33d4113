"""Benchmark the Triton SSD chunked scan against the torch reference (CUDA only).

    python -m hybridlab.benchmarks.ssd [--json out.json] [--no-ref]

For each shape (bf16, H24 P64 N128, G1, chunk 256, D per head, dt_bias, no z gate: the
Mamba-2 layer's call) it first checks the kernel against `ssd_chunked_ref` (forward output and
the gradients of x, dt, A, B, C, D, dt_bias), then times forward and forward+backward with
`triton.testing.do_bench` (median), beside the reference in the same run.

Floor (docs/measurements/README.md): FLOP = 2 B H L (Q P + 2 N P) + 2 B L Q N per forward; compulsory bytes =
read x, dt, B, C, write y. Backward counts twice the forward FLOPs and reads x, dt, B, C, dy and
writes their gradients. floor_ms = max(FLOP / 712 TFLOP/s, bytes / 4.25 TB/s), the H200's
measured bf16 matmul and copy ceilings; `share` = floor_ms / measured ms.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

PEAK_FLOPS = 712e12   # bf16 matmul 8192^3 on the lent H200
PEAK_BYTES = 4.25e12  # device-to-device copy

SHAPES = [  # (batch, seqlen, nheads, headdim, d_state, ngroups, chunk)
    (8, 2048, 24, 64, 128, 1, 256),
    (8, 8192, 24, 64, 128, 1, 256),
    (1, 65536, 24, 64, 128, 1, 256),
]


def floor(b, l, h, p, n, g, q, elt=2):
    flop = 2 * b * h * l * (q * p + 2 * n * p) + 2 * b * l * q * n * g
    io_fwd = elt * (2 * b * l * h * p + 2 * b * l * g * n + b * l * h)          # x, y; B, C; dt
    io_bwd = elt * (4 * b * l * h * p + 4 * b * l * g * n + 2 * b * l * h)       # x, dy, dx; B, C, dB, dC; dt, ddt
    return {"fwd": (flop, io_fwd), "fwdbwd": (3 * flop, io_fwd + io_bwd)}


def inputs(b, l, h, p, n, g, dtype=torch.bfloat16, device="cuda"):
    """Seeded [x, dt, A, B, C, D, dt_bias] of the Mamba-2 layer's SSD call (x: (b, l, h, p))."""
    torch.manual_seed(0)
    x = torch.randn(b, l, h, p, device=device, dtype=dtype)
    dt = (torch.randn(b, l, h, device=device) * 0.5 - 1.0).to(dtype)
    A = -(torch.rand(h, device=device) * 2.0 + 0.3)
    B = torch.randn(b, l, g, n, device=device, dtype=dtype)
    C = torch.randn(b, l, g, n, device=device, dtype=dtype)
    D = torch.randn(h, device=device)
    dt_bias = torch.randn(h, device=device) * 0.3
    return [x, dt, A, B, C, D, dt_bias]


def _call(fn, t, q):
    x, dt, A, B, C, D, dt_bias = t
    return fn(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=dt_bias)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(shape):
    """Relative errors of the kernel vs the fp32 reference on the same bf16 inputs."""
    from hybridlab.kernels import ssd_triton
    from hybridlab.kernels.ssd import ssd_chunked_ref

    b, l, h, p, n, g, q = shape
    t = [a.requires_grad_() for a in inputs(b, l, h, p, n, g)]
    t_ref = [a.detach().float().requires_grad_() for a in t]
    y = _call(ssd_triton.ssd_chunked, t, q)
    y_ref = _call(ssd_chunked_ref, t_ref, q)
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, t, dy.to(y.dtype))
    grads_ref = torch.autograd.grad(y_ref, t_ref, dy)
    errs = {"y": _rel(y, y_ref)}
    for name, a, r in zip(["x", "dt", "A", "B", "C", "D", "dt_bias"], grads, grads_ref):
        errs["d" + name] = _rel(a, r)
    return errs


def time_one(fn, shape, backward):
    import triton.testing

    b, l, h, p, n, g, q = shape
    t = inputs(b, l, h, p, n, g)
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(lambda: _call(fn, t, q), warmup=25, rep=200, return_mode="median")
    t = [a.requires_grad_() for a in t]
    dy = torch.randn(b, l, h, p, device="cuda", dtype=torch.bfloat16)

    def step():
        y = _call(fn, t, q)
        torch.autograd.grad(y, t, dy)

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def run(json_path=None, shapes=None, with_ref=True, check_correctness=True) -> list[dict]:
    """Check and time every shape; print a table; optionally write the rows as JSON."""
    if not torch.cuda.is_available():
        print("bench_ssd: needs a CUDA device (nothing timed)")
        return []
    from hybridlab.kernels import ssd_triton
    from hybridlab.kernels.ssd import ssd_chunked_ref

    rows = []
    for shape in shapes or SHAPES:
        b, l, h, p, n, g, q = shape
        name = f"B{b} L{l} H{h} P{p} N{n} G{g} Q{q}"
        errs = check(shape) if check_correctness else {}
        if errs:
            print(f"{name}: rel errors " + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
        fl = floor(b, l, h, p, n, g, q)
        impls = [("triton", ssd_triton.ssd_chunked)] + ([("torch_ref", ssd_chunked_ref)] if with_ref else [])
        for impl, fn in impls:
            for mode in ("fwd", "fwdbwd"):
                try:
                    ms = time_one(fn, shape, backward=(mode == "fwdbwd"))
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    ms = float("nan")
                flop, io = fl[mode]
                floor_ms = max(flop / PEAK_FLOPS, io / PEAK_BYTES) * 1e3
                rows.append({
                    "shape": name, "impl": impl, "mode": mode, "ms": ms,
                    "tflops": flop / ms * 1e-9, "tbps": io / ms * 1e-9,
                    "floor_ms": floor_ms, "share_of_floor": floor_ms / ms,
                    "rel_errors": errs if impl == "triton" else {},
                })
                r = rows[-1]
                print(f"{name:32s} {impl:10s} {mode:7s} {ms:9.3f} ms {r['tflops']:8.1f} TFLOP/s "
                      f"{r['tbps']:6.2f} TB/s  floor {floor_ms:.3f} ms  share {r['share_of_floor']:.2f}",
                      flush=True)
        torch.cuda.empty_cache()

    print("\n| shape | impl | mode | ms | TFLOP/s | TB/s | share of floor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
              f"{r['tbps']:.2f} | {r['share_of_floor']:.2f} |")
    if json_path:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the torch reference")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = ap.parse_args(argv)
    run(args.json, with_ref=not args.no_ref, check_correctness=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
