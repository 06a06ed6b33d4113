"""Debug the row-streaming conv1d (v3, commit 31f0a3f), which was right under the interpreter and
wrong on the H200 at multi-chunk lengths. Runs the forward and backward kernels at explicit
configs (CHUNK, BLOCK_D, num_warps, num_stages) against the torch reference and prints, per
config and length, the max error and the first differing (row, channel).

    python -P scripts/gpu_conv_rows_debug.py        # GPU, or TRITON_INTERPRET=1 on the CPU
"""
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

from hybridlab.kernels.conv1d import causal_conv1d_ref
from hybridlab.kernels.conv1d_triton import _dsilu_mul


@triton.jit
def fwd_rows(x_ptr, w_ptr, b_ptr, y_ptr, L, D, sxb, sxl, syb, syl,
             K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, VARIANT: tl.constexpr):
    pid_l = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = tl.program_id(2).to(tl.int64)
    cmask = c < D
    wm0 = tl.load(w_ptr + c * K + (K - 1), mask=cmask, other=0.0).to(tl.float32)
    wm1 = tl.load(w_ptr + c * K + (K - 2), mask=cmask, other=0.0).to(tl.float32)
    wm2 = tl.load(w_ptr + c * K + (K - 3), mask=cmask, other=0.0).to(tl.float32)
    wm3 = tl.load(w_ptr + c * K + (K - 4), mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    x_b = x_ptr + pid_b * sxb + c
    y_b = y_ptr + pid_b * syb + c
    t0 = pid_l * CHUNK
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x1, x2, x3 = zero, zero, zero
    if VARIANT == 2:  # distinct initial values
        x2 = zero + 0.0 * wm1
        x3 = zero + 0.0 * wm2
    for i in range(0, CHUNK + 3):
        u = t0 - 3 + i
        uin = (u >= 0) & (u < L)
        xu = tl.load(x_b + u.to(tl.int64) * sxl, mask=cmask & uin, other=0.0).to(tl.float32)
        pre = bias + wm0 * xu + wm1 * x1 + wm2 * x2 + wm3 * x3
        pre = pre * tl.sigmoid(pre)
        tl.store(y_b + u.to(tl.int64) * syl, pre.to(y_ptr.dtype.element_ty), mask=cmask & uin & (u >= t0))
        if VARIANT == 1:  # sequential assignments
            x3 = x2
            x2 = x1
            x1 = xu
        else:
            x3, x2, x1 = x2, x1, xu


@triton.jit
def bwd_rows(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, L, D, sxb, sxl,
             K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_l = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = tl.program_id(2).to(tl.int64)
    cmask = c < D
    wm0 = tl.load(w_ptr + c * K + (K - 1), mask=cmask, other=0.0).to(tl.float32)
    wm1 = tl.load(w_ptr + c * K + (K - 2), mask=cmask, other=0.0).to(tl.float32)
    wm2 = tl.load(w_ptr + c * K + (K - 3), mask=cmask, other=0.0).to(tl.float32)
    wm3 = tl.load(w_ptr + c * K + (K - 4), mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    x_b = x_ptr + pid_b * sxb + c
    dy_b = dy_ptr + pid_b * sxb + c
    dx_b = dx_ptr + pid_b * sxb + c
    t0 = pid_l * CHUNK
    t1 = tl.minimum(t0 + CHUNK, L)
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x1, x2, x3 = zero, zero, zero
    p1, p2, p3 = zero, zero, zero
    for i in range(0, CHUNK + 6):
        u = t0 - 3 + i
        uin = (u >= 0) & (u < L)
        xu = tl.load(x_b + u.to(tl.int64) * sxl, mask=cmask & uin, other=0.0).to(tl.float32)
        dyu = tl.load(dy_b + u.to(tl.int64) * sxl, mask=cmask & uin, other=0.0).to(tl.float32)
        pre = bias + wm0 * xu + wm1 * x1 + wm2 * x2 + wm3 * x3
        pu = _dsilu_mul(dyu, pre, True)
        dxr = wm0 * p3 + wm1 * p2 + wm2 * p1 + wm3 * pu
        r = u - 3
        tl.store(dx_b + r.to(tl.int64) * sxl, dxr.to(dx_ptr.dtype.element_ty),
                 mask=cmask & (r >= t0) & (r < t1))
        x3, x2, x1 = x2, x1, xu
        p3, p2, p1 = p2, p1, pu


def first_bad(a, b, tol):
    bad = ((a.float() - b.float()).abs() > tol).nonzero()
    return tuple(bad[0].tolist()) if len(bad) else None


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    D, K = 256 if not interp else 32, 4
    chunks = (32,) if not interp else (16, 32)
    lengths = (37, 300, 8192) if not interp else (37, 100)
    warps = (4,) if not interp else (1,)
    stages = (1, 3) if not interp else (1,)
    for var in (1, 2):
        for L, ns in itertools.product(lengths, stages):
            x = torch.randn(2, L, D, device=dev)
            w = torch.randn(D, K, device=dev) * 0.5
            b = torch.randn(D, device=dev) * 0.1
            yr = causal_conv1d_ref(x, w, b)
            y = torch.empty_like(x)
            BD = 64 if not interp else 16
            fwd_rows[(triton.cdiv(L, 32), triton.cdiv(D, BD), 2)](
                x, w, b, y, L, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), K=K, CHUNK=32,
                BLOCK_D=BD, VARIANT=var, num_warps=4, num_stages=ns)
            print(f"variant {var} L={L} stages={ns}: fwd err {(y - yr).abs().max().item():.2e} "
                  f"first bad {first_bad(y, yr, 1e-3)}", flush=True)
    for L, CH, nw, ns in itertools.product(lengths, chunks, warps, stages):
        x = torch.randn(2, L, D, device=dev)
        w = torch.randn(D, K, device=dev) * 0.5
        b = torch.randn(D, device=dev) * 0.1
        dy = torch.randn(2, L, D, device=dev)
        xr = x.clone().requires_grad_()
        yr = causal_conv1d_ref(xr, w, b)
        (dxr,) = torch.autograd.grad(yr, xr, dy)
        y = torch.empty_like(x)
        dx = torch.empty_like(x)
        BD = 64 if not interp else 16
        grid = (triton.cdiv(L, CH), triton.cdiv(D, BD), 2)
        fwd_rows[grid](x, w, b, y, L, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), K=K, CHUNK=CH, BLOCK_D=BD, VARIANT=0,
                       num_warps=nw, num_stages=ns)
        bwd_rows[grid](x, w, b, dy, dx, L, D, x.stride(0), x.stride(1), K=K, CHUNK=CH, BLOCK_D=BD,
                       num_warps=nw, num_stages=ns)
        ey = (y - yr).abs().max().item()
        ex = (dx - dxr).abs().max().item()
        print(f"L={L:5d} CHUNK={CH:3d} warps={nw} stages={ns}  fwd err {ey:.2e} first bad "
              f"{first_bad(y, yr, 1e-3)}  bwd err {ex:.2e} first bad {first_bad(dx, dxr, 1e-3)}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
