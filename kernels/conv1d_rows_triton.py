"""Row-streaming causal conv1d (+ SiLU), forward and backward, for k <= 4 taps.

The tiled kernels in `conv1d_triton.py` read every x row k times (through L2) and the backward
goes through a dpre scratch buffer. Here a program owns BLOCK_D channels of CHUNK rows of one
batch row and walks them in order, keeping the last three rows (of x, and in the backward of
dpre and of the sequence ids) in registers: each x / dy row is read once from memory, dpre never
leaves the chip, and dx[r] is written as soon as dpre[r + 3] exists. A chunk reads a halo of 3
rows on each side. Taps are padded to 4 (zero weight beyond k). Same math as the tiled kernels
(see the formulas at the top of `conv1d_triton.py`), fp32 throughout.

Triton pitfall (found on the H200, invisible under the interpreter): a loop-carried variable is
recognised by comparing the Python object it holds after the body with the one before. Shift
registers started as `x1, x2, x3 = zero, zero, zero` hold one object, so after
`x3, x2, x1 = x2, x1, xu` the compiler saw x2 and x3 as unchanged and kept them zero: every row
from the third on was wrong. Each register below starts from its own tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .conv1d_triton import _INTERPRET, _configs, _dsilu_mul
from .launch import launch

_SLOT_ROWS = 16 if _INTERPRET else 32  # divides every CHUNK of the backward's configs


@triton.jit
def _taps(w_ptr, b_ptr, c, cmask, swd, swk, K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Weights on x[t - m], m = 0..3, as four (BLOCK_D,) fp32 vectors (zero for m >= K), and the
    bias (zero without one)."""
    wm0 = tl.load(w_ptr + c * swd + (K - 1) * swk, mask=cmask, other=0.0).to(tl.float32)
    wm1 = tl.load(w_ptr + c * swd + (K - 2) * swk, mask=cmask & (K >= 2), other=0.0).to(tl.float32)
    wm2 = tl.load(w_ptr + c * swd + (K - 3) * swk, mask=cmask & (K >= 3), other=0.0).to(tl.float32)
    wm3 = tl.load(w_ptr + c * swd + (K - 4) * swk, mask=cmask & (K >= 4), other=0.0).to(tl.float32)
    bias = tl.zeros_like(wm0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    return wm0, wm1, wm2, wm3, bias


@triton.autotune(
    configs=_configs(
        {"CHUNK": 16, "BLOCK_D": 16},
        [({"CHUNK": 128, "BLOCK_D": 256}, 2), ({"CHUNK": 64, "BLOCK_D": 256}, 2),
         ({"CHUNK": 128, "BLOCK_D": 128}, 1), ({"CHUNK": 32, "BLOCK_D": 256}, 2),
         ({"CHUNK": 64, "BLOCK_D": 512}, 4)],
    ),
    key=["D", "K", "HAS_SEQ"],
)
@triton.jit
def _conv_fwd_rows_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, y_ptr,
    L, D,
    sxb, sxl, sxd, swd, swk, ssb, ssl, syb, syl, syd,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (cdiv(L, CHUNK), cdiv(D, BLOCK_D), batch)
    t0 = tl.program_id(0) * CHUNK
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = tl.program_id(2).to(tl.int64)
    cmask = c < D
    wm0, wm1, wm2, wm3, bias = _taps(w_ptr, b_ptr, c, cmask, swd, swk, K, HAS_BIAS)
    x_b = x_ptr + pid_b * sxb + c * sxd
    y_b = y_ptr + pid_b * syb + c * syd
    seq_b = seq_ptr + pid_b * ssb
    # x[u-1], x[u-2], x[u-3] and their sequence ids: separate objects (see the module docstring)
    x1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    s1 = tl.full((), -1, tl.int32)
    s2 = tl.full((), -2, tl.int32)
    s3 = tl.full((), -3, tl.int32)
    for i in range(CHUNK + 3):  # rows t0-3 .. t0+CHUNK-1; the first three are halo
        u = t0 - 3 + i
        uin = (u >= 0) & (u < L)
        xu = tl.load(x_b + u.to(tl.int64) * sxl, mask=cmask & uin, other=0.0).to(tl.float32)
        if HAS_SEQ:
            su = tl.load(seq_b + u * ssl, mask=uin, other=-1)
            pre = (bias + wm0 * xu + tl.where(s1 == su, wm1 * x1, 0.0) + tl.where(s2 == su, wm2 * x2, 0.0)
                   + tl.where(s3 == su, wm3 * x3, 0.0))
            s3, s2, s1 = s2, s1, su
        else:
            pre = bias + wm0 * xu + wm1 * x1 + wm2 * x2 + wm3 * x3
        if SILU:
            pre = pre * tl.sigmoid(pre)
        tl.store(y_b + u.to(tl.int64) * syl, pre.to(y_ptr.dtype.element_ty), mask=cmask & uin & (u >= t0))
        x3, x2, x1 = x2, x1, xu


@triton.autotune(
    configs=_configs(
        {"CHUNK": 16, "BLOCK_D": 16},
        [({"CHUNK": 128, "BLOCK_D": 256}, 2), ({"CHUNK": 64, "BLOCK_D": 256}, 2),
         ({"CHUNK": 128, "BLOCK_D": 128}, 1), ({"CHUNK": 256, "BLOCK_D": 256}, 2),
         ({"CHUNK": 64, "BLOCK_D": 512}, 4), ({"CHUNK": 32, "BLOCK_D": 256}, 2)],
    ),
    key=["D", "K", "HAS_SEQ", "SILU"],
)
@triton.jit
def _conv_bwd_rows_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    L, D, n_slots,
    sxb, sxl, sxd, swd, swk, ssb, ssl, sdyb, sdyl, sdyd, sdxb, sdxl, sdxd,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    SLOT_ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (cdiv(L, CHUNK), cdiv(D, BLOCK_D), batch). dw_ptr: (batch * n_slots, 4, D) fp32 partials,
    # row m for the tap on x[t - m], one slot per SLOT_ROWS rows; db_ptr: (batch * n_slots, D) fp32.
    pid_l = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    pid_b = tl.program_id(2).to(tl.int64)
    cmask = c < D
    wm0, wm1, wm2, wm3, bias = _taps(w_ptr, b_ptr, c, cmask, swd, swk, K, HAS_BIAS)
    x_b = x_ptr + pid_b * sxb + c * sxd
    dy_b = dy_ptr + pid_b * sdyb + c * sdyd
    dx_b = dx_ptr + pid_b * sdxb + c * sdxd
    seq_b = seq_ptr + pid_b * ssb
    t0 = pid_l * CHUNK
    t1 = tl.minimum(t0 + CHUNK, L)
    # Shift registers, each its own object (see the module docstring): x and dpre of rows u-1..u-3.
    x1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    p1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    p2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    p3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    s1 = tl.full((), -1, tl.int32)
    s2 = tl.full((), -2, tl.int32)
    s3 = tl.full((), -3, tl.int32)
    dw0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw3 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(CHUNK + 6):  # rows t0-3 .. t0+CHUNK+2: dpre of 3 halo rows on each side
        u = t0 - 3 + i
        uin = (u >= 0) & (u < L)
        xu = tl.load(x_b + u.to(tl.int64) * sxl, mask=cmask & uin, other=0.0).to(tl.float32)
        dyu = tl.load(dy_b + u.to(tl.int64) * sdyl, mask=cmask & uin, other=0.0).to(tl.float32)
        if HAS_SEQ:
            su = tl.load(seq_b + u * ssl, mask=uin, other=-1)
            h1 = tl.where(s1 == su, x1, 0.0)  # the history of u's own sequence only
            h2 = tl.where(s2 == su, x2, 0.0)
            h3 = tl.where(s3 == su, x3, 0.0)
        else:
            h1, h2, h3 = x1, x2, x3
        # pre[u] is exact for u >= t0 (its history is in the halo); halo dpre is never used.
        pu = _dsilu_mul(dyu, bias + wm0 * xu + wm1 * h1 + wm2 * h2 + wm3 * h3, SILU)  # 0 past L
        po = tl.where((u >= t0) & (u < t1), pu, 0.0)  # each row's dw/db in exactly one program
        db += po
        dw0 += po * xu
        dw1 += po * h1
        dw2 += po * h2
        dw3 += po * h3
        # dx[r], r = u - 3: x[r] enters pre[r + m] with weight wm_m, inside r's sequence
        if HAS_SEQ:
            dxr = (wm0 * p3 + tl.where(s2 == s3, wm1 * p2, 0.0) + tl.where(s1 == s3, wm2 * p1, 0.0)
                   + tl.where(su == s3, wm3 * pu, 0.0))
            s3, s2, s1 = s2, s1, su
        else:
            dxr = wm0 * p3 + wm1 * p2 + wm2 * p1 + wm3 * pu
        r = u - 3
        tl.store(dx_b + r.to(tl.int64) * sdxl, dxr.to(dx_ptr.dtype.element_ty),
                 mask=cmask & (r >= t0) & (r < t1))
        x3, x2, x1 = x2, x1, xu
        p3, p2, p1 = p2, p1, pu
    # This program covers slots [pid_l * SPC, (pid_l + 1) * SPC): its sums go in the first, zeros
    # in the rest, so every slot is written whatever CHUNK the autotuner launches (no stale
    # partials from a benchmarked config with a smaller CHUNK).
    SPC: tl.constexpr = CHUNK // SLOT_ROWS
    for j in tl.static_range(SPC):
        slot = pid_l * SPC + j
        keep = 1.0 if j == 0 else 0.0
        base = dw_ptr + (pid_b * n_slots + slot) * 4 * D + c
        smask = cmask & (slot < n_slots)
        tl.store(base, dw0 * keep, mask=smask)
        tl.store(base + D, dw1 * keep, mask=smask)
        tl.store(base + 2 * D, dw2 * keep, mask=smask)
        tl.store(base + 3 * D, dw3 * keep, mask=smask)
        if HAS_BIAS:
            tl.store(db_ptr + (pid_b * n_slots + slot) * D + c, db * keep, mask=smask)


def _seq_args(seq_idx, x):
    if seq_idx is None:
        return x, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def conv_fwd_rows(x, weight, bias, seq_idx, silu):
    b, l, d = x.shape
    k = weight.shape[1]
    assert k <= 4, k
    y = torch.empty((b, l, d), device=x.device, dtype=x.dtype)
    seq, ssb, ssl = _seq_args(seq_idx, x)
    grid = lambda META: (triton.cdiv(l, META["CHUNK"]), triton.cdiv(d, META["BLOCK_D"]), b)  # noqa: E731
    launch(_conv_fwd_rows_kernel, grid, (d, k, seq_idx is not None, x.dtype),
        x, weight, bias if bias is not None else weight, seq, y,
        l, d,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), ssb, ssl,
        y.stride(0), y.stride(1), y.stride(2),
        K=k, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
    )
    return y


def conv_bwd_rows(x, weight, bias, seq_idx, dy, silu, out_dx=None):
    b, l, d = x.shape
    k = weight.shape[1]
    assert k <= 4, k
    slot_rows = _SLOT_ROWS  # dw/db partials: one slot per this many rows, whatever the CHUNK
    n_slots = triton.cdiv(l, slot_rows)
    dx = torch.empty((b, l, d), device=x.device, dtype=x.dtype) if out_dx is None else out_dx
    dw_part = torch.empty((b * n_slots, 4, d), device=x.device, dtype=torch.float32)
    db_part = torch.empty((b * n_slots, d), device=x.device, dtype=torch.float32) if bias is not None else dw_part
    seq, ssb, ssl = _seq_args(seq_idx, x)
    grid = lambda META: (triton.cdiv(l, META["CHUNK"]), triton.cdiv(d, META["BLOCK_D"]), b)  # noqa: E731
    launch(_conv_bwd_rows_kernel, grid, (d, k, seq_idx is not None, silu, x.dtype, dy.dtype),
        x, weight, bias if bias is not None else weight, seq, dy, dx, dw_part, db_part,
        l, d, n_slots,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), ssb, ssl,
        dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
        K=k, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu, SLOT_ROWS=slot_rows,
    )
    dw = dw_part.sum(0)[:k].flip(0).t().to(weight.dtype)  # row m is the tap on x[t-m]: column k-1-m
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db
