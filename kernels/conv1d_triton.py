"""Triton causal depthwise conv1d (+ SiLU) with backward, and the one-token decode update.

Definitions are the references in `conv1d.py`. With taps j = 0..k-1 and seq_idx s,

    a[t] = bias + sum_j w[j] * x[t-(k-1)+j] * [s[t-(k-1)+j] == s[t]],   y[t] = silu(a[t])

so, with dpre = dy * silu'(a),

    dx[t]   = sum_{i=0..k-1} w[k-1-i] * dpre[t+i] * [s[t+i] == s[t]]
    dw[j]   = sum_t dpre[t] * x[t-(k-1)+j] * [same sequence]
    dbias   = sum_t dpre[t]

The backward recomputes `a` (it saves only x). For k <= 4 (Mamba-2) the row-streaming kernels
of `conv1d_rows_triton.py` run; the tiled kernels here serve any k: the forward over row tiles,
the backward as a dpre kernel (+ dw/dbias partials), then a dx stencil over the dpre scratch
buffer (shifted tiles are re-read from L1/L2). x is (b, l, d) with any strides (Mamba-2 slices
x/B/C out of the in-projection, so rows are usually not contiguous); all math is fp32.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .conv1d import _silu_flag
from .launch import launch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_AUTOTUNE = os.environ.get("HYBRIDLAB_AUTOTUNE", "1") != "0"


def _configs(interp, gpu):
    """One config under the interpreter (autotune with several fails there), a few on the GPU;
    HYBRIDLAB_AUTOTUNE=0 keeps only the first GPU config (fast compiles, e.g. for tests)."""
    if _INTERPRET:
        return [triton.Config(interp, num_warps=1)]
    gpu = gpu if _AUTOTUNE else gpu[:1]
    return [triton.Config(c, num_warps=w) for c, w in gpu]


# --------------------------------------------------------------------------------------------
# forward


@triton.autotune(
    configs=_configs(
        {"BLOCK_L": 16, "BLOCK_D": 16},
        # ptxas (sm_90a, k=4): 86 / 80 / 88 / 101 / 168 registers per thread. Fewer registers,
        # more resident warps: the first config is the default when autotuning is off.
        [({"BLOCK_L": 16, "BLOCK_D": 128}, 4), ({"BLOCK_L": 8, "BLOCK_D": 256}, 4),
         ({"BLOCK_L": 16, "BLOCK_D": 256}, 8), ({"BLOCK_L": 32, "BLOCK_D": 128}, 8),
         ({"BLOCK_L": 32, "BLOCK_D": 128}, 4)],
    ),
    key=["D", "K", "HAS_SEQ"],
)
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, y_ptr,
    L, D,
    sxb, sxl, sxd, swd, swk, ssb, ssl, syb, syl, syd,
    K: tl.constexpr, KP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    x_base = x_ptr + pid_b * sxb
    seq_base = seq_ptr + pid_b * ssb
    if HAS_SEQ:
        s_t = tl.load(seq_base + t * ssl, mask=t < L, other=-1)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        q = t + (j - (K - 1))  # tap j reads x[t-(k-1)+j]
        m = (q >= 0) & (q < L)
        if HAS_SEQ:
            s_q = tl.load(seq_base + q * ssl, mask=m, other=-2)
            m = m & (s_q == s_t)
        xq = tl.load(x_base + q[:, None] * sxl + c[None, :] * sxd,
                     mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        w_j = tl.load(w_ptr + c * swd + j * swk, mask=cmask, other=0.0).to(tl.float32)
        acc += xq * w_j[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + pid_b * syb + t[:, None] * syl + c[None, :] * syd,
             acc.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------
# backward


@triton.jit
def _dsilu_mul(dy, a, SILU: tl.constexpr):
    """dy * silu'(a), silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)."""
    g = dy
    if SILU:
        s = tl.sigmoid(a)
        g = dy * (s * (1.0 + a * (1.0 - s)))
    return g


# --------------------------------------------------------------------------------------------
# backward: two streaming kernels
#
# One fused kernel that recomputes dpre at t, t+1, .., t+k-1 per tile (reading x and dy once
# from DRAM) keeps ~7 fp32 tiles live and issues 3k-1 shifted loads per tile: register-bound,
# it was slower than this split on the H200 (docs/measurements/README.md, second session):
#
#   A  (_conv_bwd_dpre_kernel): pre = bias + sum_j w_j x[t-(k-1)+j] (k shifted loads, masked at
#      0 and at sequence boundaries as the forward), dpre = dy * silu'(pre), written to a
#      contiguous (b, l, d) scratch; dw[j] = sum_t dpre[t] x[t-(k-1)+j] and dbias = sum_t dpre
#      accumulated over a CHUNK_L run of rows into per-program fp32 slots (summed in torch:
#      deterministic, no atomics).
#   B  (_conv_bwd_dx_kernel): dx[t] = sum_i w[k-1-i] dpre[t+i] [t+i < l, s[t+i] == s[t]].
#
# Each kernel holds ~2-3 tiles live. DRAM traffic per element: x, dy read, dpre written (A);
# dpre read, dx written (B). With a 16-bit scratch that is 10 bytes against the fused floor's 6
# (bf16); with fp32 scratch 14.
#
# Scratch precision: dpre = dy * silu'(a) with silu' in (-0.1, 1.1], so it has dy's range, and
# dy already comes in x's dtype. Storing it in that dtype (bf16/fp16) adds one rounding per
# term of the k-term sum for dx, which is itself rounded to the same dtype: relative error about
# 2x the unavoidable output rounding. dw and dbias use the fp32 dpre inside kernel A, so they
# are unaffected. `_BWD_DPRE_LOWP = False` (HYBRIDLAB_CONV_BWD_LOWP=0) keeps it in fp32.
# Offsets: per-tile base pointers are formed in int64 (batch, row0); in-tile offsets are small.


@triton.autotune(
    configs=_configs(
        {"BLOCK_L": 16, "BLOCK_D": 16},
        [({"BLOCK_L": 32, "BLOCK_D": 128}, 4), ({"BLOCK_L": 64, "BLOCK_D": 128}, 8),
         ({"BLOCK_L": 16, "BLOCK_D": 256}, 4), ({"BLOCK_L": 32, "BLOCK_D": 256}, 8),
         ({"BLOCK_L": 64, "BLOCK_D": 64}, 4), ({"BLOCK_L": 64, "BLOCK_D": 256}, 8)],
    ),
    key=["D", "K", "HAS_SEQ", "SILU", "CHUNK_L"],
)
@triton.jit
def _conv_bwd_dpre_kernel(
    x_ptr, w_ptr, b_ptr, seq_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr,
    L, D, n_chunks,
    sxb, sxl, sxd, swd, swk, ssb, ssl, sdyb, sdyl, sdyd,
    K: tl.constexpr, KP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_D channels x CHUNK_L rows of one batch row, in BLOCK_L steps.
    g_ptr: contiguous (b, l, d) dpre scratch. dw_ptr: (b * n_chunks, k, d) fp32 partials,
    db_ptr: (b * n_chunks, d) fp32 partials."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    r = tl.arange(0, BLOCK_L)
    kidx = tl.arange(0, KP)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_b = x_ptr + pid_b * sxb
    dy_b = dy_ptr + pid_b * sdyb
    g_b = g_ptr + pid_b * L * D
    seq_b = seq_ptr + pid_b * ssb
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dw_acc = tl.zeros((KP, BLOCK_D), dtype=tl.float32)
    for it in range(CHUNK_L // BLOCK_L):
        t0 = pid_l * CHUNK_L + it * BLOCK_L
        t = t0 + r
        tmask = t < L
        t064 = t0.to(tl.int64)
        x_t = x_b + t064 * sxl  # row t0 of this batch row; tap rows are r + o, o <= 0
        if HAS_SEQ:
            s_t = tl.load(seq_b + t * ssl, mask=tmask, other=-1)
        a = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32) + bias[None, :]
        for j in tl.static_range(K):
            o = j - (K - 1)
            m = (t + o >= 0) & tmask
            if HAS_SEQ:
                s_q = tl.load(seq_b + (t + o) * ssl, mask=m, other=-2)
                m = m & (s_q == s_t)
            xq = tl.load(x_t + (r + o)[:, None] * sxl + c[None, :] * sxd,
                         mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            w_j = tl.load(w_ptr + c * swd + j * swk, mask=cmask, other=0.0).to(tl.float32)
            a += xq * w_j[None, :]
        tile = tmask[:, None] & cmask[None, :]
        dy = tl.load(dy_b + t064 * sdyl + r[:, None] * sdyl + c[None, :] * sdyd,
                     mask=tile, other=0.0).to(tl.float32)
        g = _dsilu_mul(dy, a, SILU)  # 0 outside the tile's valid rows (dy masked to 0)
        tl.store(g_b + t064 * D + r[:, None] * D + c[None, :], g.to(g_ptr.dtype.element_ty),
                 mask=tile)
        db_acc += tl.sum(g, axis=0)
        # dw: the k tap tiles again (L1/L2 hits). In sm_90 PTX for k=4, bf16, 32x128 the
        # compiler reloads them when SILU is on and keeps the first reads live without it.
        for j in tl.static_range(K):
            o = j - (K - 1)
            m = (t + o >= 0) & tmask
            if HAS_SEQ:
                s_q = tl.load(seq_b + (t + o) * ssl, mask=m, other=-2)
                m = m & (s_q == s_t)
            xq = tl.load(x_t + (r + o)[:, None] * sxl + c[None, :] * sxd,
                         mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            contrib = tl.sum(g * xq, axis=0)
            dw_acc += tl.where(kidx[:, None] == j, contrib[None, :], 0.0)
    slot = pid_b * n_chunks + pid_l
    tl.store(dw_ptr + slot * K * D + kidx[:, None] * D + c[None, :], dw_acc,
             mask=(kidx[:, None] < K) & cmask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + slot * D + c, db_acc, mask=cmask)


@triton.autotune(
    configs=_configs(
        {"BLOCK_L": 16, "BLOCK_D": 16},
        [({"BLOCK_L": 64, "BLOCK_D": 128}, 4), ({"BLOCK_L": 32, "BLOCK_D": 128}, 4),
         ({"BLOCK_L": 64, "BLOCK_D": 256}, 8), ({"BLOCK_L": 128, "BLOCK_D": 128}, 8),
         ({"BLOCK_L": 16, "BLOCK_D": 256}, 4), ({"BLOCK_L": 32, "BLOCK_D": 64}, 4)],
    ),
    key=["D", "K", "HAS_SEQ"],
)
@triton.jit
def _conv_bwd_dx_kernel(
    g_ptr, w_ptr, seq_ptr, dx_ptr,
    L, D,
    swd, swk, ssb, ssl, sdxb, sdxl, sdxd,
    K: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[t] = sum_i w[k-1-i] dpre[t+i] over t+i < l in t's sequence; g_ptr is the contiguous
    (b, l, d) dpre scratch from `_conv_bwd_dpre_kernel`."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    r = tl.arange(0, BLOCK_L)
    t0 = pid_l * BLOCK_L
    t = t0 + r
    tmask = t < L
    t064 = t0.to(tl.int64)
    g_t = g_ptr + (pid_b * L + t064) * D
    seq_b = seq_ptr + pid_b * ssb
    if HAS_SEQ:
        s_t = tl.load(seq_b + t * ssl, mask=tmask, other=-1)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(K):
        m = t + i < L
        if HAS_SEQ:
            s_p = tl.load(seq_b + (t + i) * ssl, mask=m, other=-2)
            m = m & (s_p == s_t)
        gi = tl.load(g_t + (r + i)[:, None] * D + c[None, :],
                     mask=m[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        w_i = tl.load(w_ptr + c * swd + (K - 1 - i) * swk, mask=cmask, other=0.0).to(tl.float32)
        dx += gi * w_i[None, :]
    tl.store(dx_ptr + pid_b * sdxb + t064 * sdxl + r[:, None] * sdxl + c[None, :] * sdxd,
             dx.to(dx_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------------
# one-token update (decoding)


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, y_ptr,
    D,
    sxb, sxd, stb, std, stk, swd, swk, syb, syd,
    K: tl.constexpr, KP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    kidx = tl.arange(0, KP)
    st_ptrs = state_ptr + pid_b * stb + c[:, None] * std
    # roll left: new[:, j] = old[:, j+1]; new[:, k-1] = x (cast to the state's dtype, as the
    # reference's in-place assignment does). Each program owns its (b, channels) slab, so
    # reading before writing needs no barrier.
    shifted = tl.load(st_ptrs + (kidx[None, :] + 1) * stk,
                      mask=cmask[:, None] & (kidx[None, :] + 1 < K), other=0.0)
    xv = tl.load(x_ptr + pid_b * sxb + c * sxd, mask=cmask, other=0.0).to(shifted.dtype)
    new = tl.where(kidx[None, :] == K - 1, xv[:, None], shifted)
    tl.store(st_ptrs + kidx[None, :] * stk, new, mask=cmask[:, None] & (kidx[None, :] < K))
    wt = tl.load(w_ptr + c[:, None] * swd + kidx[None, :] * swk,
                 mask=cmask[:, None] & (kidx[None, :] < K), other=0.0).to(tl.float32)
    y = tl.sum(new.to(tl.float32) * wt, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + pid_b * syb + c * syd, y.to(y_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------------------------
# host side


def _rows(k):
    return _ROWS and k <= 4


def _conv_fwd(x, weight, bias, seq_idx, silu):
    b, l, d = x.shape
    k = weight.shape[1]
    if _rows(k):
        from .conv1d_rows_triton import conv_fwd_rows
        return conv_fwd_rows(x, weight, bias, seq_idx, silu)
    y = torch.empty((b, l, d), device=x.device, dtype=x.dtype)
    has_seq = seq_idx is not None
    seq = seq_idx if has_seq else x
    grid = lambda META: (triton.cdiv(l, META["BLOCK_L"]), triton.cdiv(d, META["BLOCK_D"]), b)  # noqa: E731
    launch(_conv_fwd_kernel, grid, (d, k, has_seq, x.dtype),
        x, weight, bias if bias is not None else weight, seq, y,
        l, d,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1),
        seq.stride(0) if has_seq else 0, seq.stride(1) if has_seq else 0,
        y.stride(0), y.stride(1), y.stride(2),
        K=k, KP=triton.next_power_of_2(k),
        HAS_BIAS=bias is not None, HAS_SEQ=has_seq, SILU=silu,
    )
    return y


def _chunk_l(l):
    # Rows per dpre program (dw/dbias partial slots: b * l / CHUNK_L). A multiple of every
    # BLOCK_L of `_conv_bwd_dpre_kernel`'s configs (<= 64).
    if _INTERPRET:
        return 32
    return 256 if l >= 4096 else 64


def _conv_bwd(x, weight, bias, seq_idx, dy, silu, out_dx=None):
    b, l, d = x.shape
    k = weight.shape[1]
    if _rows(k):
        from .conv1d_rows_triton import conv_bwd_rows
        return conv_bwd_rows(x, weight, bias, seq_idx, dy, silu, out_dx)
    chunk = _chunk_l(l)
    n_chunks = triton.cdiv(l, chunk)
    lowp = _BWD_DPRE_LOWP and dy.dtype in (torch.bfloat16, torch.float16)
    g = torch.empty((b, l, d), device=x.device, dtype=dy.dtype if lowp else torch.float32)
    dx = torch.empty((b, l, d), device=x.device, dtype=x.dtype) if out_dx is None else out_dx
    dw_part = torch.empty((b * n_chunks, k, d), device=x.device, dtype=torch.float32)
    db_part = torch.empty((b * n_chunks, d), device=x.device, dtype=torch.float32) if bias is not None else dw_part
    has_seq = seq_idx is not None
    seq = seq_idx if has_seq else x
    ssb, ssl = (seq.stride(0), seq.stride(1)) if has_seq else (0, 0)
    grid_a = lambda META: (n_chunks, triton.cdiv(d, META["BLOCK_D"]), b)  # noqa: E731
    launch(_conv_bwd_dpre_kernel, grid_a, (d, k, has_seq, silu, chunk, x.dtype, dy.dtype),
        x, weight, bias if bias is not None else weight, seq, dy, g, dw_part, db_part,
        l, d, n_chunks,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), ssb, ssl,
        dy.stride(0), dy.stride(1), dy.stride(2),
        K=k, KP=triton.next_power_of_2(k),
        HAS_BIAS=bias is not None, HAS_SEQ=has_seq, SILU=silu, CHUNK_L=chunk,
    )
    grid_b = lambda META: (triton.cdiv(l, META["BLOCK_L"]), triton.cdiv(d, META["BLOCK_D"]), b)  # noqa: E731
    launch(_conv_bwd_dx_kernel, grid_b, (d, k, has_seq, g.dtype),
        g, weight, seq, dx,
        l, d,
        weight.stride(0), weight.stride(1), ssb, ssl, dx.stride(0), dx.stride(1), dx.stride(2),
        K=k, HAS_SEQ=has_seq,
    )
    dw = dw_part.sum(0).t().to(weight.dtype)  # (d, k)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


# k <= 4 (Mamba-2's conv): the row-streaming kernels of `conv1d_rows_triton.py`, which read
# each row once (faster fwd+bwd than the tiles, most on Mamba-2's strided slice: numbers in
# docs/measurements/README.md). False runs the tiled kernels above (tests, `row_kernels`).
_ROWS = True


@contextlib.contextmanager
def row_kernels(enabled: bool):
    """Within the block, k <= 4 runs the row-streaming kernels (True) or the tiled ones (False):
    the rows-vs-tiles A/B in one process (scripts/gpu_profile.py)."""
    global _ROWS
    saved, _ROWS = _ROWS, enabled
    try:
        yield
    finally:
        _ROWS = saved


# Keep the dpre scratch in dy's dtype when that is bf16/fp16 (else fp32); README, "Kernels".
_BWD_DPRE_LOWP = os.environ.get("HYBRIDLAB_CONV_BWD_LOWP", "1") != "0"


def _seq_i32(seq_idx):
    return None if seq_idx is None else seq_idx.to(torch.int32).contiguous()


def forward(x, weight, bias, seq_idx, silu):
    """The forward kernel: y (b, l, d) in x's dtype. The backward needs only the inputs (it
    recomputes the pre-activation), so nothing else is returned. weight is (d, k)."""
    return _conv_fwd(x, weight, bias, _seq_i32(seq_idx), silu)


def backward(dy, x, weight, bias, seq_idx, silu, out_dx=None):
    """The backward kernels: dx (x's dtype; written into `out_dx` if given, any strides),
    dweight (weight's; contiguous, as the op's fake says: the kernels' partial sums come out
    transposed), dbias (bias's; None without)."""
    dx, dw, db = _conv_bwd(x, weight, bias, _seq_i32(seq_idx), dy, silu, out_dx)
    return dx, dw.contiguous(), db


class CausalConv1dFn(torch.autograd.Function):
    """The kernels on any device (the interpreter's on the CPU). Models reach them through the
    custom op `hybridlab::causal_conv1d` (conv1d.py) instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu):
        seq_idx = _seq_i32(seq_idx)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        return forward(x, weight, bias, seq_idx, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dw, db = backward(dy, x, weight, bias, seq_idx, ctx.silu)
        return dx, dw, db, None, None


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation="silu"):
    """x (b, l, d); weight (d, k); bias (d,); seq_idx (b, l). Returns (b, l, d) in x's dtype.

    Same function as `causal_conv1d_ref`, differentiable in x, weight and bias.
    """
    silu = _silu_flag(activation)
    if weight.dim() == 3:  # nn.Conv1d's (d, 1, k)
        weight = weight.squeeze(1)
    return CausalConv1dFn.apply(x, weight, bias, seq_idx, silu)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    """One token for the whole batch in one launch: x (b, d); conv_state (b, d, k), updated in
    place (roll left, append x). Returns (b, d) in x's dtype."""
    silu = _silu_flag(activation)
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    b, d = x.shape
    k = weight.shape[1]
    assert conv_state.shape == (b, d, k), (conv_state.shape, (b, d, k))
    y = torch.empty((b, d), device=x.device, dtype=x.dtype)
    block_d = 16 if _INTERPRET else 256
    _conv_update_kernel[(b, triton.cdiv(d, block_d))](
        x, conv_state, weight, bias if bias is not None else weight, y,
        d,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        K=k, KP=triton.next_power_of_2(k), HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d,
        num_warps=1 if _INTERPRET else 4,
    )
    return y
