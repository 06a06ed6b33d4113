"""Triton Mamba-2 SSD chunked scan (forward and backward) and the one-token decode step.

The chunked form (Dao & Gu 2024, Sec. 6 "SSD algorithm") with chunks of Q tokens, per head h:

    a_t   = dt_t * A                         log-decay of one step (A < 0)
    cs_t  = sum_{s<=t, s in chunk} a_s       chunk-local cumulative log-decay
    L_ts  = exp(cs_t - cs_s) [s<=t] [same sequence]                         (Q, Q)
    y_t   = sum_s (C_t . B_s) L_ts dt_s x_s            "diagonal block"  (intra-chunk)
          + exp(cs_t) C_t . S_{c-1}                    "off-diagonal"    (carried state)
          + D x_t,   then   y_t *= silu(z_t)
    S_c   = exp(cs_Q) S_{c-1} + sum_s exp(cs_Q - cs_s) dt_s x_s B_s^T       state passing

Forward kernels (one launch each):
    1. _dt_cumsum_fwd     dt <- clamp(softplus(dt + dt_bias)); cs = cumsum(dt*A) per chunk
    2. _chunk_state_fwd   every chunk's own end state sum_s w_s x_s B_s^T    (P, N) fp32
    3. _state_passing_fwd the short recurrence over L/Q chunks -> carried states, final state
    3b. _bmm_chunk_fwd    CB = C B^T once per (batch, chunk, group), shared by the group's heads
    4. _chunk_scan_fwd    the output: masked (CB * L) @ (dt x) + C @ S^T * exp(cs) + D x, gate

Backward kernels:
    _chunk_state_fwd (readout mode)  dS_c from the off-diagonal readout: sum_t dy_t exp(cs_t) C_t^T
    _state_passing_bwd               reverse recurrence -> dS per chunk, d initial state, d cs_Q
    _bwd_dx_db                       rows s: dx, dB, ddt, dcs (source side of L), over heads of a group
    _bwd_dc                          rows t: dC, dcs (target side of L); the group's heads are summed
                                     on each (t, s) tile before the N-wide matmuls with B, so those
                                     run once per tile instead of once per head
    _dt_bwd                          the chunk-local reverse cumsum of dcs and the dt chain back
                                     through clamp, softplus and bias (was ~20 small torch ops)

State is accumulated in fp32 everywhere (in registers, along the chunk recurrence and inside
each chunk). What goes through memory between kernels is stored narrower for bf16 inputs: the
carried states S_{c-1} (input dtype for bf16/fp16: they enter a bf16 matmul anyway), and, for
bf16 only, each chunk's own state, C B^T, and their gradients (`_buf_dtype`): each of these is
either a bf16 matmul operand or one addend of an fp32 running sum. Halving those buffers cut
the memory traffic of the state passing and of the per-head reloads in the backward.

Packed sequences (`seq_idx`): L_ts is zero across a change of sequence id; a chunk's state
contribution keeps only tokens of the chunk's last sequence; the carried state is dropped when
the chunk's last token is not in the sequence that ended the previous chunk (reference semantics,
`ssd.ssd_chunked_ref`). `initial_states` belong to the sequence of token 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# HYBRIDLAB_AUTOTUNE=0 takes each kernel's first GPU config (quick compiles for tests).
_AUTOTUNE = os.environ.get("HYBRIDLAB_AUTOTUNE", "1") != "0"


def _configs(gpu_configs, cpu_config):
    """Autotune on the GPU only: the interpreter fails with more than one config."""
    if _INTERPRET:
        return [cpu_config]
    return gpu_configs if _AUTOTUNE else gpu_configs[:1]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # Under the CPU interpreter tl.dot on bf16/fp16 operands is wrong: compute it in fp32 there.
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


# --------------------------------------------------------------------------------------------
# 1. dt preparation and chunk-local cumulative log-decay
# --------------------------------------------------------------------------------------------
@triton.jit
def _dt_cumsum_fwd(
    dt_ptr, dt_bias_ptr, A_ptr, dt_out_ptr, cs_out_ptr,
    L, H, stride_dt_b, stride_dt_l, stride_dt_h,
    dt_min, dt_max,
    Q: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    # grid (n_chunks, batch, cdiv(H, BLOCK_H)); outputs (B, H, n_chunks * Q) fp32, padded with dt = 0
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = pid_c * Q + offs_q
    in_seq = (offs_q < Q) & (t < L)
    mask = in_seq[:, None] & (offs_h[None, :] < H)
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + t[:, None] * stride_dt_l + offs_h[None, :] * stride_dt_h,
                 mask=mask, other=0.0).to(tl.float32)                       # (BLOCK_Q, BLOCK_H)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        # torch's softplus: identity above 20
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask, dt, 0.0)   # padding: decay 1, no input
    A = tl.load(A_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
    cs = tl.cumsum(dt * A[None, :], axis=0)
    out = pid_b * H * (tl.num_programs(0) * Q) + offs_h[None, :] * (tl.num_programs(0) * Q) + t[:, None]
    smask = (offs_q < Q)[:, None] & (offs_h[None, :] < H)
    tl.store(dt_out_ptr + out, dt, mask=smask)
    tl.store(cs_out_ptr + out, cs, mask=smask)


# --------------------------------------------------------------------------------------------
# 2. per-chunk states: acc[p, n] = sum_s X_s[p] w_s Y_s[n]
#    state mode  : X = x, Y = B, w_s = dt_s exp(cs_Q - cs_s) [seq_s == seq of the chunk's end]
#    readout mode: X = dy, Y = C, w_t = exp(cs_t) [seq_t == seq carried in]  (backward: dS_{c-1})
# --------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_P": bp, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
         for bp, bn, bk, w, s in [(64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (32, 128, 64, 4, 3),
                                  (64, 128, 64, 8, 3), (64, 128, 128, 8, 2), (64, 64, 128, 4, 2),
                                  (64, 128, 128, 4, 2), (64, 128, 32, 4, 4)]],
        triton.Config({"BLOCK_P": 16, "BLOCK_N": 32, "BLOCK_K": 32}),  # P < N: the x-scaling path
    ),
    key=["P", "N", "Q", "READOUT"],
)
@triton.jit
def _chunk_state_fwd(
    X_ptr, Y_ptr, dt_ptr, cs_ptr, seq_ptr, out_ptr,
    L, H, P, N, HPG,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_y_b, stride_y_l, stride_y_g, stride_y_n,
    stride_seq_b,
    Q: tl.constexpr, READOUT: tl.constexpr, HAS_SEQ: tl.constexpr, F32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid (cdiv(P, BLOCK_P) * cdiv(N, BLOCK_N) * H, batch * n_chunks); out (B, nc, H, P, N) fp32.
    # Heads vary fastest so that programs running together share the B (or C) tiles in L2.
    pid_pn = tl.program_id(0) // H
    h = tl.program_id(0) % H
    pid_bc = tl.program_id(1)
    nc = tl.cdiv(L, Q)
    b = (pid_bc // nc).to(tl.int64)
    c = pid_bc % nc
    g = h // HPG
    n_pblk = tl.cdiv(P, BLOCK_P)
    offs_p = (pid_pn % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pblk) * BLOCK_N + tl.arange(0, BLOCK_N)
    t0 = c * Q
    chunk_len = tl.minimum(Q, L - t0)
    row = (b * H + h) * (nc * Q) + t0          # this (b, h, chunk) in the (B, H, nc*Q) buffers
    X_ptr += b * stride_x_b + h * stride_x_h + t0 * stride_x_l
    Y_ptr += b * stride_y_b + g * stride_y_g + t0 * stride_y_l
    if READOUT:
        if HAS_SEQ:
            seq_in = tl.load(seq_ptr + b * stride_seq_b + tl.maximum(t0 - 1, 0))
    else:
        cs_end = tl.load(cs_ptr + row + Q - 1)
        if HAS_SEQ:
            seq_end = tl.load(seq_ptr + b * stride_seq_b + t0 + chunk_len - 1)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, chunk_len, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        kmask = offs_k < chunk_len
        xt = tl.load(X_ptr + offs_k[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                     mask=kmask[None, :] & (offs_p[:, None] < P), other=0.0)      # (BLOCK_P, BLOCK_K)
        yk = tl.load(Y_ptr + offs_k[:, None] * stride_y_l + offs_n[None, :] * stride_y_n,
                     mask=kmask[:, None] & (offs_n[None, :] < N), other=0.0)      # (BLOCK_K, BLOCK_N)
        cs = tl.load(cs_ptr + row + offs_k, mask=kmask, other=0.0)
        if READOUT:
            w = tl.exp(cs)
            if HAS_SEQ:
                sq = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_k, mask=kmask, other=0)
                w = tl.where(sq == seq_in, w, 0.0)
        else:
            dt = tl.load(dt_ptr + row + offs_k, mask=kmask, other=0.0)
            w = dt * tl.exp(tl.minimum(cs_end - cs, 0.0))
            if HAS_SEQ:
                sq = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_k, mask=kmask, other=0)
                w = tl.where(sq == seq_end, w, 0.0)
        w = tl.where(kmask, w, 0.0)
        # The weight w_s scales one operand: the narrower tile, so fewer multiplies (x's
        # (P, K) tile when the state is wider than the head, P < N, as in Mamba-2).
        if BLOCK_P < BLOCK_N:
            xw = (xt.to(tl.float32) * w[None, :]).to(xt.dtype)
            acc += _dot(xw, yk, F32)
        else:
            yw = (yk.to(tl.float32) * w[:, None]).to(yk.dtype)
            acc += _dot(xt, yw, F32)
    out = out_ptr + (pid_bc.to(tl.int64) * H + h) * P * N
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


# --------------------------------------------------------------------------------------------
# 3. state passing over chunks (sequential in c, parallel over (b, h, P*N))
# --------------------------------------------------------------------------------------------
@triton.jit
def _chunk_carry(cs_ptr, seq_ptr, row, b, c, L, stride_seq_b, Q: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Factor on S_{c-1} in S_c: exp(cs_Q), or 0 if chunk c's last token left the carried sequence."""
    decay = tl.exp(tl.load(cs_ptr + row + Q - 1))
    if HAS_SEQ:
        t0 = c * Q
        seq_end = tl.load(seq_ptr + b * stride_seq_b + tl.minimum(t0 + Q, L) - 1)
        seq_in = tl.load(seq_ptr + b * stride_seq_b + tl.maximum(t0 - 1, 0))
        decay = tl.where(seq_end == seq_in, decay, 0.0)
    return decay


@triton.jit
def _state_passing_fwd(
    states_ptr, init_ptr, cs_ptr, seq_ptr, prev_ptr, final_ptr,
    L, H, PN, stride_seq_b,
    Q: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    # grid (cdiv(P*N, BLOCK), batch, H). states (B, nc, H, P*N) fp32 -> prev (B, nc, H, P*N)
    # holds S_{c-1} (the state entering chunk c); final (B, H, P*N) fp32.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    mask = offs < PN
    nc = tl.cdiv(L, Q)
    if HAS_INIT:
        state = tl.load(init_ptr + (b * H + h) * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, nc):
        base = ((b * nc + c) * H + h) * PN
        tl.store(prev_ptr + base + offs, state.to(prev_ptr.dtype.element_ty), mask=mask)
        decay = _chunk_carry(cs_ptr, seq_ptr, (b * H + h) * (nc * Q) + c * Q, b, c, L, stride_seq_b,
                             Q, HAS_SEQ)
        state = decay * state + tl.load(states_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(final_ptr + (b * H + h) * PN + offs, state, mask=mask)


@triton.jit
def _state_passing_bwd(
    dprev_ptr, prev_ptr, dfinal_ptr, cs_ptr, seq_ptr, dstates_ptr, dinit_ptr, dcs_end_ptr,
    L, H, PN, stride_seq_b,
    Q: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    # Reverse of S_c = d_c S_{c-1} + X_c.  G = dLoss/dS_c (after chunk c):
    #   dX_c = G;  dLoss/dS_{c-1} = dprev_c (readout of chunk c) + d_c G;  dd_c = <G, S_{c-1}>.
    # dcs_end (B, H, nc, n_blocks) gets d_c * <G, S_{c-1}> = dLoss/dcs_Q for this block of P*N.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    mask = offs < PN
    nc = tl.cdiv(L, Q)
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + (b * H + h) * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, nc):
        c = nc - 1 - i
        base = ((b * nc + c) * H + h) * PN
        tl.store(dstates_ptr + base + offs, G.to(dstates_ptr.dtype.element_ty), mask=mask)
        decay = _chunk_carry(cs_ptr, seq_ptr, (b * H + h) * (nc * Q) + c * Q, b, c, L, stride_seq_b,
                             Q, HAS_SEQ)
        prev = tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dcs_end_ptr + ((b * H + h) * nc + c) * tl.num_programs(0) + pid,
                 decay * tl.sum(G * prev, axis=0))
        G = tl.load(dprev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) + decay * G
    tl.store(dinit_ptr + (b * H + h) * PN + offs, G, mask=mask)


# --------------------------------------------------------------------------------------------
# 3b. CB = C B^T per (batch, chunk, group): shared by the H/G heads of a group, so the forward
#     computes it once here instead of once per head in the chunk scan. (The backward kernels
#     recompute their tiles with tl.dot: faster on the H200 than re-reading this fp32 buffer
#     from every head; docs/measurements/README.md.)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bmm_chunk_fwd(
    C_ptr, B_ptr, cb_ptr, L, G, N,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    F32: tl.constexpr,
):
    # grid (cdiv(Q, BLOCK_M) * cdiv(Q, BLOCK_S), batch * n_chunks, G) -> cb (B, nc, G, Q, Q) fp32.
    # Every block is written (rows/cols past the sequence end are 0), so consumers may read any tile.
    pid = tl.program_id(0)
    pid_bc = tl.program_id(1)
    g = tl.program_id(2)
    nc = tl.cdiv(L, Q)
    b = (pid_bc // nc).to(tl.int64)
    c = pid_bc % nc
    n_sblk: tl.constexpr = Q // BLOCK_S
    offs_m = (pid // n_sblk) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = (pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S)
    t0 = c * Q
    chunk_len = tl.minimum(Q, L - t0)
    base = b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    acc = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for k in range(0, N, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        Cm = tl.load(C_ptr + base + offs_m[:, None] * stride_bc_l + offs_k[None, :] * stride_bc_n,
                     mask=(offs_m[:, None] < chunk_len) & (offs_k[None, :] < N), other=0.0)
        BsT = tl.load(B_ptr + base + offs_s[None, :] * stride_bc_l + offs_k[:, None] * stride_bc_n,
                      mask=(offs_s[None, :] < chunk_len) & (offs_k[:, None] < N), other=0.0)
        acc += _dot(Cm, BsT, F32)
    out = cb_ptr + ((pid_bc.to(tl.int64) * G + g) * Q) * Q
    tl.store(out + offs_m[:, None] * Q + offs_s[None, :], acc.to(cb_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# 4. chunk scan: the output
# --------------------------------------------------------------------------------------------
@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_P": bp, "N_SPLIT": ns}, num_warps=w, num_stages=s)
         for bm, bk, bp, ns, w, s in [
             (64, 64, 64, 1, 4, 2), (64, 32, 64, 1, 4, 3), (128, 64, 64, 1, 8, 2), (64, 64, 64, 1, 4, 3),
             (128, 64, 64, 1, 4, 2), (64, 64, 32, 1, 4, 2), (128, 32, 64, 1, 8, 3),
             (64, 64, 64, 2, 4, 2), (64, 64, 64, 2, 4, 3), (128, 64, 64, 2, 8, 2), (64, 32, 64, 2, 4, 3)]],
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_P": 32, "N_SPLIT": 2}),
    ),
    key=["P", "N", "Q"],
)
@triton.jit
def _chunk_scan_fwd(
    x_ptr, cb_ptr, C_ptr, dt_ptr, cs_ptr, seq_ptr, prev_ptr, D_ptr, z_ptr, y_ptr, ypre_ptr,
    L, H, P, N, HPG,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_seq_b,
    Q: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, N_SPLIT: tl.constexpr,
):
    # grid (cdiv(Q, BLOCK_M) * cdiv(P, BLOCK_P) * H, batch * n_chunks): rows t of y (BLOCK_M, BLOCK_P).
    # Heads vary fastest: the heads of a group read the same CB and C tiles, which stay in L2.
    # x (B, L, H, P) may be a view (of the conv's output); z, y, ypre share y's strides; C has
    # (B, L, G, N); cb is (B, nc, G, Q, Q).
    pid_mp = tl.program_id(0) // H
    h = tl.program_id(0) % H
    pid_bc = tl.program_id(1)
    nc = tl.cdiv(L, Q)
    b = (pid_bc // nc).to(tl.int64)
    c = pid_bc % nc
    g = h // HPG
    n_pblk = tl.cdiv(P, BLOCK_P)
    pid_m = pid_mp // n_pblk
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = (pid_mp % n_pblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    t0 = c * Q
    chunk_len = tl.minimum(Q, L - t0)
    mmask = offs_m < chunk_len
    pmask = offs_p < P
    row = (b * H + h) * (nc * Q) + t0
    x_base = x_ptr + b * stride_x_b + h * stride_x_h + t0 * stride_x_l
    C_base = C_ptr + b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    cb_base = cb_ptr + ((pid_bc.to(tl.int64) * (H // HPG) + g) * Q) * Q

    cs_m = tl.load(cs_ptr + row + offs_m, mask=mmask, other=0.0)
    if HAS_SEQ:
        seq_m = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_m, mask=mmask, other=-1)
        seq_in = tl.load(seq_ptr + b * stride_seq_b + tl.maximum(t0 - 1, 0))

    # Off-diagonal block: exp(cs_t) C_t . S_{c-1}   (prev state read as (N, P)), over N in
    # N_SPLIT slices: fewer live registers than whole (BLOCK_M, N) and (N, BLOCK_P) tiles.
    BLOCK_KN: tl.constexpr = BLOCK_N // N_SPLIT
    prev_base = prev_ptr + (pid_bc.to(tl.int64) * H + h) * P * N
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for n0 in tl.static_range(0, BLOCK_N, BLOCK_KN):
        offs_n = n0 + tl.arange(0, BLOCK_KN)
        nmask = offs_n < N
        Cm = tl.load(C_base + offs_m[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                     mask=mmask[:, None] & nmask[None, :], other=0.0)             # (BLOCK_M, BLOCK_KN)
        prevT = tl.load(prev_base + offs_p[None, :] * N + offs_n[:, None],
                        mask=nmask[:, None] & pmask[None, :], other=0.0)          # (BLOCK_KN, BLOCK_P)
        acc += _dot(Cm, prevT.to(Cm.dtype), F32)
    scale = tl.exp(cs_m)
    if HAS_SEQ:
        scale = tl.where(seq_m == seq_in, scale, 0.0)
    acc = acc * scale[:, None]                                                    # (BLOCK_M, BLOCK_P)

    # Diagonal block: sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s, only s-blocks up to the diagonal.
    hi = tl.minimum(chunk_len, (pid_m + 1) * BLOCK_M)
    for k in range(0, hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        kmask = offs_k < chunk_len
        cb = tl.load(cb_base + offs_m[:, None] * Q + offs_k[None, :],
                     mask=mmask[:, None] & kmask[None, :], other=0.0)             # (BLOCK_M, BLOCK_K)
        cs_k = tl.load(cs_ptr + row + offs_k, mask=kmask, other=0.0)
        dt_k = tl.load(dt_ptr + row + offs_k, mask=kmask, other=0.0)
        keep = (offs_m[:, None] >= offs_k[None, :]) & kmask[None, :]
        if HAS_SEQ:
            seq_k = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_k, mask=kmask, other=-2)
            keep &= seq_m[:, None] == seq_k[None, :]
        # exponent <= 0 on kept entries; -inf elsewhere so nothing overflows
        decay = tl.exp(tl.where(keep, cs_m[:, None] - cs_k[None, :], float("-inf")))
        w = cb * decay * dt_k[None, :]
        xk = tl.load(x_base + offs_k[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                     mask=kmask[:, None] & pmask[None, :], other=0.0)             # (BLOCK_K, BLOCK_P)
        acc += _dot(w.to(xk.dtype), xk, F32)

    iomask = mmask[:, None] & pmask[None, :]
    if HAS_D:
        Dp = tl.load(D_ptr + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        xm = tl.load(x_base + offs_m[:, None] * stride_x_l + offs_p[None, :] * stride_x_p,
                     mask=iomask, other=0.0).to(tl.float32)
        acc += xm * Dp[None, :]
    io = (b * stride_y_b + h * stride_y_h + t0 * stride_y_l
          + offs_m[:, None] * stride_y_l + offs_p[None, :] * stride_y_p)
    if HAS_Z:
        # keep the ungated output for the backward of the gate
        tl.store(ypre_ptr + io, acc.to(ypre_ptr.dtype.element_ty), mask=iomask)
        zm = tl.load(z_ptr + io, mask=iomask, other=0.0).to(tl.float32)
        acc = acc * zm * tl.sigmoid(zm)
    tl.store(y_ptr + io, acc.to(y_ptr.dtype.element_ty), mask=iomask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _gate_bwd(dy_ptr, z_ptr, ypre_ptr, dypre_ptr, dz_ptr, numel, BLOCK: tl.constexpr):
    # y = ypre * silu(z):  dypre = dy silu(z);  dz = dy ypre sig(z) (1 + z (1 - sig(z)))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    yp = tl.load(ypre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sz = tl.sigmoid(z)
    tl.store(dypre_ptr + offs, (dy * z * sz).to(dypre_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + offs, (dy * yp * sz * (1.0 + z * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dt_bwd(
    dcs_a_ptr, dcs_b_ptr, dcse_ptr, dcs_end_ptr, ddt_ptr, dt_p_ptr, A_ptr, dt_ptr, dt_bias_ptr,
    ddt_raw_ptr, dA_part_ptr, dbias_part_ptr,
    L, H, n_end, stride_dt_b, stride_dt_l, stride_dt_h, stride_ddt_b, stride_ddt_l, stride_ddt_h,
    dt_min, dt_max,
    Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    # grid (n_chunks, batch, cdiv(H, BLOCK_H)): the reverse of `_dt_cumsum_fwd` for one chunk.
    #   dcs_t = dcs_a + dcs_b (+ the chunk-end terms at t = Q-1: dcs_end partials and sum_s dcse_s)
    #   da_s = sum_{t>=s} dcs_t;  dA += da dt;  d(dt) = ddt + da A;  then back through the
    #   clamp, the softplus and the bias to the raw dt (B, L, H). dA and ddt_bias partials per
    #   program: (batch * n_chunks, H), summed outside.
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    nc = tl.num_programs(0)
    offs_q = tl.arange(0, Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    t = pid_c * Q + offs_q
    mask = (t < L)[:, None] & hmask[None, :]
    buf = pid_b * H * (nc * Q) + offs_h[None, :] * (nc * Q) + t[:, None]           # (Q, BLOCK_H)
    dcs = (tl.load(dcs_a_ptr + buf, mask=mask, other=0.0) + tl.load(dcs_b_ptr + buf, mask=mask, other=0.0))
    offs_e = tl.arange(0, BLOCK_E)
    ends = tl.load(dcs_end_ptr + ((pid_b * H + offs_h[None, :]) * nc + pid_c) * n_end + offs_e[:, None],
                   mask=(offs_e < n_end)[:, None] & hmask[None, :], other=0.0)     # (BLOCK_E, BLOCK_H)
    end = tl.sum(ends, axis=0) + tl.sum(tl.load(dcse_ptr + buf, mask=mask, other=0.0), axis=0)
    dcs += tl.where(offs_q[:, None] == Q - 1, end[None, :], 0.0)                     # cs_Q: the padded end
    da = tl.cumsum(dcs, axis=0, reverse=True)
    dt = tl.load(dt_p_ptr + buf, mask=mask, other=0.0)
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)
    part = pid_b * nc + pid_c
    tl.store(dA_part_ptr + part * H + offs_h, tl.sum(da * dt, axis=0), mask=hmask)
    g = tl.load(ddt_ptr + buf, mask=mask, other=0.0) + da * A[None, :]
    v = tl.load(dt_ptr + pid_b * stride_dt_b + t[:, None] * stride_dt_l + offs_h[None, :] * stride_dt_h,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(dt_bias_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LIMIT:
        pre = v
        if SOFTPLUS:
            pre = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
        g = tl.where((pre >= dt_min) & (pre <= dt_max), g, 0.0)
    if SOFTPLUS:
        g = tl.where(v > 20.0, g, g * tl.sigmoid(v))
    g = tl.where(mask, g, 0.0)
    tl.store(ddt_raw_ptr + pid_b * stride_ddt_b + t[:, None] * stride_ddt_l + offs_h[None, :] * stride_ddt_h,
             g.to(ddt_raw_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + part * H + offs_h, tl.sum(g, axis=0), mask=hmask)


# (rows, columns, warps, stages) of the backward kernels' (s, t) tiles. Short loops of small
# tiles: deeper pipelining and smaller tiles (more programs per SM) are what hide latency here.
_BWD_CONFIGS = [(64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2), (64, 64, 8, 3), (64, 64, 4, 3)]


@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_S": bs, "BLOCK_T": bt}, num_warps=w, num_stages=s)
         for bs, bt, w, s in _BWD_CONFIGS + [(64, 128, 8, 2)]],
        triton.Config({"BLOCK_S": 32, "BLOCK_T": 32}),
    ),
    key=["P", "N", "Q", "HEADS_PER_PROG"],
    reset_to_zero=["dD_ptr"],   # partial sums are indexed by row block, which depends on the config
)
@triton.jit
def _bwd_dx_db(
    x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, cs_ptr, seq_ptr, dstates_ptr, D_ptr,
    dx_ptr, dB_ptr, ddt_ptr, dcs_ptr, dcse_ptr, dD_ptr,
    L, H, P, N, HPG, HEADS_PER_PROG, N_SPLIT,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    stride_dx_b, stride_dx_l, stride_dx_h, stride_dx_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_seq_b,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, F32: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # grid (cdiv(Q, BLOCK_S), batch * n_chunks, G * N_SPLIT). Rows s of one chunk, for the
    # HEADS_PER_PROG heads of one split of group g; dB is summed over those heads here.
    # x, dy and dx each have their own strides (x and dx may be views of xBC and its gradient).
    # With M_ts = (C_t . B_s) L_ts and w_s = dt_s exp(cs_Q - cs_s) [seq_s == seq_end]:
    #   dx_s   = dt_s sum_{t>=s} M_ts dy_t  +  w_s dS B_s  +  D dy_s
    #   dB_s   = sum_t dt_s (dy_t . x_s) L_ts C_t  +  w_s x_s dS
    #   ddt_s  = sum_t M_ts (dy_t . x_s)  +  exp(cs_Q - cs_s)[..] (x_s . dS B_s)
    #   dcs_s  = -sum_t R_ts  -  w_s (x_s . dS B_s),  R_ts = M_ts dt_s (dy_t . x_s)
    #   dcs_Q += w_s (x_s . dS B_s)      (stored per row s in dcse, summed per chunk outside)
    pid_s = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    nc = tl.cdiv(L, Q)
    b = (pid_bc // nc).to(tl.int64)
    c = pid_bc % nc
    g = pid_gs // N_SPLIT
    h_first = g * HPG + (pid_gs % N_SPLIT) * HEADS_PER_PROG
    t0 = c * Q
    chunk_len = tl.minimum(Q, L - t0)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    smask = offs_s < chunk_len
    pmask = offs_p < P
    nmask = offs_n < N
    B_base = B_ptr + b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    C_base = C_ptr + b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    Bs = tl.load(B_base + offs_s[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                 mask=smask[:, None] & nmask[None, :], other=0.0)                 # (BLOCK_S, BLOCK_N)
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_s, mask=smask, other=-1)
        seq_end = tl.load(seq_ptr + b * stride_seq_b + t0 + chunk_len - 1)
        mixed = tl.load(seq_ptr + b * stride_seq_b + t0) != seq_end  # more than one document
    dB = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    io_s = offs_s[:, None] * stride_x_l + offs_p[None, :] * stride_x_p
    iomask = smask[:, None] & pmask[None, :]
    hi = chunk_len

    for hh in range(0, HEADS_PER_PROG):
        h = h_first + hh
        row = (b * H + h) * (nc * Q) + t0
        xh_base = b * stride_x_b + h * stride_x_h + t0 * stride_x_l
        yh_base = b * stride_y_b + h * stride_y_h + t0 * stride_y_l
        xs = tl.load(x_ptr + xh_base + io_s, mask=iomask, other=0.0)              # (BLOCK_S, BLOCK_P)
        cs_s = tl.load(cs_ptr + row + offs_s, mask=smask, other=0.0)
        dt_s = tl.load(dt_ptr + row + offs_s, mask=smask, other=0.0)
        cs_end = tl.load(cs_ptr + row + Q - 1)

        # --- chunk-state term: S_c += sum_s w_s x_s B_s^T
        dS = tl.load(dstates_ptr + (pid_bc.to(tl.int64) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                     mask=pmask[:, None] & nmask[None, :], other=0.0)              # (BLOCK_P, BLOCK_N) fp32
        dS = dS.to(Bs.dtype)
        e_s = tl.exp(tl.minimum(cs_end - cs_s, 0.0))
        if HAS_SEQ:
            e_s = tl.where(seq_s == seq_end, e_s, 0.0)
        e_s = tl.where(smask, e_s, 0.0)
        w_s = e_s * dt_s
        dSB = _dot(Bs, tl.trans(dS), F32)                                         # (BLOCK_S, BLOCK_P)
        dx_state = dSB * w_s[:, None]
        dB += _dot(xs, dS, F32) * w_s[:, None]
        dw = tl.sum(dSB * xs.to(tl.float32), axis=1)                              # (BLOCK_S,)
        ddt_s = dw * e_s
        dcs_s = -dw * w_s

        # --- diagonal blocks: targets t >= s
        dx_acc = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
        for k in range(pid_s * BLOCK_S, hi, BLOCK_T):
            offs_t = k + tl.arange(0, BLOCK_T)
            tmask = offs_t < chunk_len
            CtT = tl.load(C_base + offs_t[None, :] * stride_bc_l + offs_n[:, None] * stride_bc_n,
                          mask=tmask[None, :] & nmask[:, None], other=0.0)          # (BLOCK_N, BLOCK_T)
            dyt = tl.load(dy_ptr + yh_base + offs_t[:, None] * stride_y_l + offs_p[None, :] * stride_y_p,
                          mask=tmask[:, None] & pmask[None, :], other=0.0)          # (BLOCK_T, BLOCK_P)
            cs_t = tl.load(cs_ptr + row + offs_t, mask=tmask, other=0.0)
            keep = (offs_t[None, :] >= offs_s[:, None]) & tmask[None, :] & smask[:, None]
            if HAS_SEQ:
                if mixed:  # a chunk of one document needs no document test
                    seq_t = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_t, mask=tmask, other=-2)
                    keep &= seq_s[:, None] == seq_t[None, :]
            LT = tl.exp(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))  # (BLOCK_S, BLOCK_T)
            # recomputed for every head: re-reading the forward's C B^T tile instead was slower
            # twice (fp32, and bf16 in the eleventh session: docs/measurements/README.md)
            cbT = _dot(Bs, CtT, F32)                                               # (C_t . B_s)^T
            MT = cbT * LT                                                          # M^T
            xdy = _dot(xs, tl.trans(dyt), F32)                                     # (BLOCK_S, BLOCK_T)
            dx_acc += _dot(MT.to(dyt.dtype), dyt, F32)
            r = MT * xdy
            ddt_s += tl.sum(r, axis=1)
            dcs_s -= tl.sum(r, axis=1) * dt_s
            dCBT = xdy * LT * dt_s[:, None]
            dB += _dot(dCBT.to(CtT.dtype), tl.trans(CtT), F32)

        dx = dx_acc * dt_s[:, None] + dx_state
        if HAS_D:
            Dp = tl.load(D_ptr + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
            dys = tl.load(dy_ptr + yh_base + offs_s[:, None] * stride_y_l + offs_p[None, :] * stride_y_p,
                          mask=iomask, other=0.0).to(tl.float32)
            dx += dys * Dp[None, :]
            # dD partial over these rows: (B * nc, n_sblocks, H, P)
            tl.store(dD_ptr + ((pid_bc.to(tl.int64) * tl.num_programs(0) + pid_s) * H + h) * P + offs_p,
                     tl.sum(dys * xs.to(tl.float32), axis=0), mask=pmask)
        tl.store(dx_ptr + b * stride_dx_b + h * stride_dx_h + (t0 + offs_s)[:, None] * stride_dx_l
                 + offs_p[None, :] * stride_dx_p, dx.to(dx_ptr.dtype.element_ty), mask=iomask)
        tl.store(ddt_ptr + row + offs_s, ddt_s, mask=smask)
        tl.store(dcs_ptr + row + offs_s, dcs_s, mask=smask)
        tl.store(dcse_ptr + row + offs_s, dw * w_s, mask=smask)

    # dB partial: (B, L, N_SPLIT, G, N) fp32, summed over splits outside
    G_ = tl.num_programs(2) // N_SPLIT
    dB_rows = (b * L + t0 + offs_s).to(tl.int64) * (N_SPLIT * G_ * N) + ((pid_gs % N_SPLIT) * G_ + g) * N
    tl.store(dB_ptr + dB_rows[:, None] + offs_n[None, :], dB, mask=smask[:, None] & nmask[None, :])


@triton.jit
def _dc_tile(
    x_ptr, B_base, dy_ptr, dt_ptr, cs_ptr, seq_ptr, Ct, dC, dcs, k, b, t0, chunk_len,
    h_first, nc, H, HEADS_PER_PROG, offs_t, offs_p, offs_n, offs_hh, tmask, pmask, nmask, io_t, seq_t,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_y_b, stride_y_l, stride_y_h,
    stride_bc_l, stride_bc_n, stride_seq_b,
    Q: tl.constexpr, MASKED: tl.constexpr, HAS_SEQ: tl.constexpr, F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One s-block of `_bwd_dc`'s diagonal part: dC += (sum_h dCB_h) B_s, dcs_h += rowsum(dCB_h * CB).
    MASKED: the block may reach t < s, the chunk end or a sequence change; else every (t, s) is
    kept (rows t past the chunk end may overflow, but they are never stored)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    offs_s = k + tl.arange(0, BLOCK_S)
    smask = offs_s < chunk_len
    Bs = tl.load(B_base + offs_s[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                 mask=smask[:, None] & nmask[None, :], other=0.0)                  # (BLOCK_S, BLOCK_N)
    cb = _dot(Ct, tl.trans(Bs), F32)                                               # (BLOCK_T, BLOCK_S)
    if MASKED:
        keep0 = (offs_t[:, None] >= offs_s[None, :]) & smask[None, :] & tmask[:, None]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_s, mask=smask, other=-2)
            keep0 &= seq_t[:, None] == seq_s[None, :]
    dCB_sum = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    for hh in range(0, HEADS_PER_PROG):
        h = h_first + hh
        row = (b * H + h) * (nc * Q) + t0
        xh_base = b * stride_x_b + h * stride_x_h + t0 * stride_x_l
        dyt = tl.load(dy_ptr + b * stride_y_b + h * stride_y_h + t0 * stride_y_l + io_t,
                      mask=tmask[:, None] & pmask[None, :], other=0.0)             # (BLOCK_T, BLOCK_P)
        xsT = tl.load(x_ptr + xh_base + offs_s[None, :] * stride_x_l + offs_p[:, None] * stride_x_p,
                      mask=smask[None, :] & pmask[:, None], other=0.0)             # (BLOCK_P, BLOCK_S)
        cs_t = tl.load(cs_ptr + row + offs_t, mask=tmask, other=0.0)
        cs_s = tl.load(cs_ptr + row + offs_s, mask=smask, other=0.0)
        dt_s = tl.load(dt_ptr + row + offs_s, mask=smask, other=0.0)
        if MASKED:
            Lm = tl.exp(tl.where(keep0, cs_t[:, None] - cs_s[None, :], float("-inf")))
        else:
            Lm = tl.exp2((cs_t * LOG2E)[:, None] - (cs_s * LOG2E)[None, :])
        dCB = _dot(dyt, xsT, F32) * Lm * dt_s[None, :]                               # (BLOCK_T, BLOCK_S)
        dcs += tl.where(offs_hh[:, None] == hh, tl.sum(dCB * cb, axis=1)[None, :], 0.0)
        dCB_sum += dCB
    dC += _dot(dCB_sum.to(Bs.dtype), Bs, F32)
    return dC, dcs


@triton.autotune(
    configs=_configs(
        [triton.Config({"BLOCK_T": bt, "BLOCK_S": bs}, num_warps=w, num_stages=s)
         for bt, bs, w, s in _BWD_CONFIGS + [(64, 64, 4, 4), (32, 64, 4, 3)]],
        triton.Config({"BLOCK_T": 32, "BLOCK_S": 32}),
    ),
    key=["P", "N", "Q", "HEADS_PER_PROG"],
)
@triton.jit
def _bwd_dc(
    x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, cs_ptr, seq_ptr, prev_ptr,
    dC_ptr, dcs_ptr,
    L, H, P, N, HPG, HEADS_PER_PROG, N_SPLIT,
    stride_x_b, stride_x_l, stride_x_h, stride_x_p,
    stride_y_b, stride_y_l, stride_y_h, stride_y_p,
    stride_bc_b, stride_bc_l, stride_bc_g, stride_bc_n,
    stride_seq_b,
    Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HH: tl.constexpr,
    HAS_SEQ: tl.constexpr, F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid (cdiv(Q, BLOCK_T), batch * n_chunks, G * N_SPLIT). Rows t of one chunk:
    #   dC_t  = sum_{s<=t} (sum_h dt_s (dy_t . x_s) L_ts) B_s  +  sum_h exp(cs_t)[seq_t == seq_in] dy_t S_{c-1}
    #   dcs_t = sum_s dCB_ts (C_t . B_s)  +  C_t . (off-diagonal part of dC_t)      (per head)
    # As in _bwd_db the head sum is taken on the tile before the N-wide matmul; the per-head
    # dcs rows live in a (BLOCK_HH, BLOCK_T) register tile until the end.
    pid_t = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    nc = tl.cdiv(L, Q)
    b = (pid_bc // nc).to(tl.int64)
    c = pid_bc % nc
    g = pid_gs // N_SPLIT
    h_first = g * HPG + (pid_gs % N_SPLIT) * HEADS_PER_PROG
    t0 = c * Q
    chunk_len = tl.minimum(Q, L - t0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_hh = tl.arange(0, BLOCK_HH)
    tmask = offs_t < chunk_len
    pmask = offs_p < P
    nmask = offs_n < N
    B_base = B_ptr + b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    C_base = C_ptr + b * stride_bc_b + g * stride_bc_g + t0 * stride_bc_l
    io_t = offs_t[:, None] * stride_y_l + offs_p[None, :] * stride_y_p              # dy's rows t
    Ct = tl.load(C_base + offs_t[:, None] * stride_bc_l + offs_n[None, :] * stride_bc_n,
                 mask=tmask[:, None] & nmask[None, :], other=0.0)                 # (BLOCK_T, BLOCK_N)
    seq_t = offs_t   # unused without HAS_SEQ
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b * stride_seq_b + t0 + offs_t, mask=tmask, other=-1)
        seq_in = tl.load(seq_ptr + b * stride_seq_b + tl.maximum(t0 - 1, 0))
    dC = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    dcs = tl.zeros((BLOCK_HH, BLOCK_T), dtype=tl.float32)

    # off-diagonal readout, one head at a time
    for hh in range(0, HEADS_PER_PROG):
        h = h_first + hh
        row = (b * H + h) * (nc * Q) + t0
        dyt = tl.load(dy_ptr + b * stride_y_b + h * stride_y_h + t0 * stride_y_l + io_t,
                      mask=tmask[:, None] & pmask[None, :], other=0.0)              # (BLOCK_T, BLOCK_P)
        cs_t = tl.load(cs_ptr + row + offs_t, mask=tmask, other=0.0)
        prev = tl.load(prev_ptr + (pid_bc.to(tl.int64) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                       mask=pmask[:, None] & nmask[None, :], other=0.0)           # (BLOCK_P, BLOCK_N)
        scale = tl.exp(cs_t)
        if HAS_SEQ:
            scale = tl.where(seq_t == seq_in, scale, 0.0)
        dC_off = _dot(dyt, prev.to(dyt.dtype), F32) * scale[:, None]
        dC += dC_off
        dcs += tl.where(offs_hh[:, None] == hh, tl.sum(dC_off * Ct.to(tl.float32), axis=1)[None, :], 0.0)

    # diagonal blocks: sources s <= t. s-blocks wholly before this row block, inside one
    # sequence, have every s < t in the chunk: they skip the compare/select mask and take one
    # exp2 per element. The same split is slower in _bwd_dx_db (three inlined loop copies) and
    # no faster in _chunk_scan_fwd (docs/measurements/README.md, third session).
    hi = tl.minimum(chunk_len, (pid_t + 1) * BLOCK_T)
    lo_diag = (pid_t * BLOCK_T) // BLOCK_S * BLOCK_S
    if HAS_SEQ:  # only a chunk holding one document keeps the unmasked blocks (ids non-decreasing)
        seq_last = tl.load(seq_ptr + b * stride_seq_b + t0 + chunk_len - 1)
        seq_first = tl.load(seq_ptr + b * stride_seq_b + t0)
        lo_diag = tl.where(seq_first == seq_last, lo_diag, 0)
    for k in range(0, lo_diag, BLOCK_S):
        dC, dcs = _dc_tile(x_ptr, B_base, dy_ptr, dt_ptr, cs_ptr, seq_ptr, Ct, dC, dcs, k, b, t0, chunk_len,
                           h_first, nc, H, HEADS_PER_PROG, offs_t, offs_p, offs_n, offs_hh, tmask, pmask, nmask,
                           io_t, seq_t, stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_y_b,
                           stride_y_l, stride_y_h, stride_bc_l, stride_bc_n, stride_seq_b, Q, False, HAS_SEQ,
                           F32, BLOCK_T, BLOCK_S)
    for k in range(lo_diag, hi, BLOCK_S):
        dC, dcs = _dc_tile(x_ptr, B_base, dy_ptr, dt_ptr, cs_ptr, seq_ptr, Ct, dC, dcs, k, b, t0, chunk_len,
                           h_first, nc, H, HEADS_PER_PROG, offs_t, offs_p, offs_n, offs_hh, tmask, pmask, nmask,
                           io_t, seq_t, stride_x_b, stride_x_l, stride_x_h, stride_x_p, stride_y_b,
                           stride_y_l, stride_y_h, stride_bc_l, stride_bc_n, stride_seq_b, Q, True, HAS_SEQ,
                           F32, BLOCK_T, BLOCK_S)

    for hh in range(0, HEADS_PER_PROG):
        row = (b * H + h_first + hh) * (nc * Q) + t0
        tl.store(dcs_ptr + row + offs_t, tl.sum(tl.where(offs_hh[:, None] == hh, dcs, 0.0), axis=0), mask=tmask)
    G_ = tl.num_programs(2) // N_SPLIT
    dC_rows = (b * L + t0 + offs_t).to(tl.int64) * (N_SPLIT * G_ * N) + ((pid_gs % N_SPLIT) * G_ + g) * N
    tl.store(dC_ptr + dC_rows[:, None] + offs_n[None, :], dC, mask=tmask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
# Grid size below which _bwd_dx_db/_bwd_dc split a group's heads over programs (partial dB/dC
# summed outside). Larger splits fill the GPU; _bwd_dc then redoes its per-tile N-wide matmuls
# once per split instead of once per group.
_SPLIT_TARGET = 2048


def _n_split(heads_per_group: int, programs: int, target: int) -> int:
    """Split a group's heads over programs until the grid is large enough (dB/dC are summed)."""
    split = 1
    while programs * split < target:
        nxt = next((d for d in range(split + 1, heads_per_group + 1) if heads_per_group % d == 0), None)
        if nxt is None:
            break
        split = nxt
    return split


def _prev_dtype(x):
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _buf_dtype(x):
    """Storage of per-chunk intermediates (chunk states, their gradients, C B^T): bf16 for bf16
    inputs, since each enters a bf16 matmul or an fp32 running sum (the carried state and its
    gradient stay fp32 in registers); fp32 otherwise (fp16's range is too small for states)."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _forward(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx):
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    nc = triton.cdiv(l, Q)
    dev = x.device
    F32 = _INTERPRET

    dt_p = torch.empty(b, h, nc * Q, device=dev, dtype=torch.float32)   # (B, H, nc*Q)
    cs = torch.empty_like(dt_p)
    has_limit = dt_limit is not None and tuple(dt_limit) != (0.0, float("inf"))
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if has_limit else (0.0, 0.0)
    BH = min(_pow2(h, 1), 8 if Q > 128 else 16)
    _dt_cumsum_fwd[(nc, b, triton.cdiv(h, BH))](
        dt, dt_bias if dt_bias is not None else dt, A, dt_p, cs,
        l, h, dt.stride(0), dt.stride(1), dt.stride(2), lo, hi,
        Q=Q, BLOCK_Q=_pow2(Q), BLOCK_H=BH,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
    )

    seq = seq_idx if seq_idx is not None else cs   # dummy pointer when absent
    stride_seq = seq_idx.stride(0) if seq_idx is not None else 0
    states = torch.empty(b, nc, h, p, n, device=dev, dtype=_buf_dtype(x))
    grid = lambda M: (triton.cdiv(p, M["BLOCK_P"]) * triton.cdiv(n, M["BLOCK_N"]) * h, b * nc)
    launch(_chunk_state_fwd, grid, (p, n, Q, False, x.dtype),
        x, B, dt_p, cs, seq, states, l, h, p, n, h // g,
        *x.stride(), *B.stride(), stride_seq,
        Q=Q, READOUT=False, HAS_SEQ=seq_idx is not None, F32=F32,
    )

    prev = torch.empty(b, nc, h, p, n, device=dev, dtype=_prev_dtype(x))
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    BLOCK = min(1024, _pow2(p * n))
    _state_passing_fwd[(triton.cdiv(p * n, BLOCK), b, h)](
        states, initial_states if initial_states is not None else states, cs, seq, prev, final,
        l, h, p * n, stride_seq,
        Q=Q, HAS_INIT=initial_states is not None, HAS_SEQ=seq_idx is not None, BLOCK=BLOCK,
    )
    del states

    cb = torch.empty(b, nc, g, Q, Q, device=dev, dtype=_buf_dtype(x))             # C_t . B_s per chunk
    BQ = min(Q, 64)
    _bmm_chunk_fwd[((Q // BQ) ** 2, b * nc, g)](
        C, B, cb, l, g, n, *B.stride(), Q=Q, BLOCK_M=BQ, BLOCK_S=BQ, BLOCK_K=min(_pow2(n), 64), F32=F32,
        num_warps=4,
    )

    y = torch.empty(x.shape, device=dev, dtype=x.dtype)                            # contiguous, as z
    ypre = torch.empty_like(y) if z is not None else None
    grid = lambda M: (triton.cdiv(Q, M["BLOCK_M"]) * triton.cdiv(p, M["BLOCK_P"]) * h, b * nc)
    launch(_chunk_scan_fwd, grid, (p, n, Q, x.dtype),
        x, cb, C, dt_p, cs, seq, prev, D if D is not None else x, z if z is not None else x, y,
        ypre if ypre is not None else y,
        l, h, p, n, h // g, *x.stride(), *y.stride(), *B.stride(), stride_seq,
        Q=Q, BLOCK_N=_pow2(n, 32), HAS_SEQ=seq_idx is not None, HAS_D=D is not None,
        HAS_Z=z is not None, F32=F32,
    )
    return y, final, dt_p, cs, prev, ypre


def _sum_into(partials, dtype, out):
    """partials (B, L, splits, G, N) fp32 summed over the splits, in `dtype`, or into `out`."""
    if out is None:
        return partials.sum(2).to(dtype)
    out.copy_(partials.sum(2))
    return out


def _limit(dt_limit):
    """(lo, hi) as floats, or None where nothing is clamped (no limit, or (0, inf))."""
    if dt_limit is None or tuple(dt_limit) == (0.0, float("inf")):
        return None
    return float(dt_limit[0]), float(dt_limit[1])


def _prepare(x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx):
    """The layouts the kernels read. x, dt, B and C keep their strides (the kernels take them:
    in Mamba-2 they are views of the conv's output and the in-projection, which a copy would
    only duplicate), B and C in x's dtype (they enter the same matmuls as x) and with one
    layout; z, D (as (H, P)), the initial states and seq_idx (int32) contiguous. No-ops on
    inputs already so, so `backward` can prepare the saved inputs again."""
    h, p = x.shape[2:]
    assert h % B.shape[-2] == 0, "nheads must be a multiple of ngroups"
    assert chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0, "chunk_size: a power of two >= 16"
    A = A.contiguous()
    B, C = B.to(x.dtype), C.to(x.dtype)
    if B.stride() != C.stride():  # the kernels index both with B's strides
        B, C = B.contiguous(), C.contiguous()
    if D is not None:
        D = (D[:, None].expand(h, p) if D.dim() == 1 else D).contiguous()
    z = z.contiguous() if z is not None else None
    init = initial_states.contiguous() if initial_states is not None else None
    seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    return x, dt, A, B, C, D, z, init, seq_idx


def forward(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=True,
            dt_limit=None, initial_states=None, seq_idx=None):
    """The forward kernels. Returns y (b, l, h, p) in x's dtype, final_states (b, h, p, n) fp32,
    and what `backward` needs: dt_p, cs (b, h, nc*Q) fp32, prev (b, nc, h, p, n), ypre (y before
    the gate; None without z)."""
    x, dt, A, B, C, Dh, z, init, seq_idx = _prepare(x, dt, A, B, C, chunk_size, D, z, initial_states,
                                                    seq_idx)
    return _forward(x, dt, A, B, C, chunk_size, Dh, z, dt_bias, dt_softplus, _limit(dt_limit), init,
                    seq_idx)


def backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p, cs, prev, ypre,
             chunk_size=256, dt_softplus=True, dt_limit=None, out_dx=None, out_dB=None, out_dC=None,
             out_ddt=None):
    """The backward kernels, from `forward`'s inputs (as they were given to it) and its saved
    outputs; dfinal (the final state's gradient) may be None. Returns dx, ddt, dA, dB, dC, dD, dz,
    ddt_bias, dinitial_states, each in its input's dtype and shape (contiguous, or written into
    `out_dx` / `out_dB` / `out_dC` / `out_ddt` where given: e.g. views of one d(xBC) buffer);
    None for absent inputs."""
    B_dtype, C_dtype, D_in = B.dtype, C.dtype, D
    x, dt_raw, A, B, C, D, z, init, seq_idx = _prepare(x, dt, A, B, C, chunk_size, D, z, initial_states,
                                                       seq_idx)
    dt_limit = _limit(dt_limit)
    dfinal = dfinal.contiguous() if dfinal is not None else None
    Q = chunk_size
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    nc = triton.cdiv(l, Q)
    dev = x.device
    F32 = _INTERPRET
    has_seq = seq_idx is not None
    seq = seq_idx if has_seq else cs
    stride_seq = seq_idx.stride(0) if has_seq else 0
    dy = dy.contiguous()

    dz = None
    if z is not None:
        dy_pre = torch.empty_like(dy)
        dz = torch.empty_like(z)
        numel = dy.numel()
        _gate_bwd[(triton.cdiv(numel, 1024),)](dy, z, ypre, dy_pre, dz, numel, BLOCK=1024)
        dy = dy_pre

    # dS_{c-1} from the off-diagonal readout of chunk c: sum_t exp(cs_t) dy_t C_t^T   (B, nc, H, P, N)
    dprev = torch.empty(b, nc, h, p, n, device=dev, dtype=_buf_dtype(x))
    grid = lambda M: (triton.cdiv(p, M["BLOCK_P"]) * triton.cdiv(n, M["BLOCK_N"]) * h, b * nc)
    launch(_chunk_state_fwd, grid, (p, n, Q, True, dy.dtype),
        dy, C, dt_p, cs, seq, dprev, l, h, p, n, h // g,
        *dy.stride(), *C.stride(), stride_seq,
        Q=Q, READOUT=True, HAS_SEQ=has_seq, F32=F32,
    )

    # reverse state passing -> dS_c (gradient of each chunk's own state contribution)
    dstates = torch.empty_like(dprev)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    BLOCK = min(1024, _pow2(p * n))
    n_blk = triton.cdiv(p * n, BLOCK)
    dcs_end_sp = torch.empty(b, h, nc, n_blk, device=dev, dtype=torch.float32)
    _state_passing_bwd[(n_blk, b, h)](
        dprev, prev, dfinal if dfinal is not None else dprev, cs, seq, dstates, dinit, dcs_end_sp,
        l, h, p * n, stride_seq,
        Q=Q, HAS_DFINAL=dfinal is not None, HAS_SEQ=has_seq, BLOCK=BLOCK,
    )
    del dprev

    hpg = h // g
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype) if out_dx is None else out_dx
    # (B, H, nc*Q): every position of the sequence is written; _dt_bwd masks the padding
    ddt = torch.empty(b, h, nc * Q, device=dev, dtype=torch.float32)
    dcs_a = torch.empty_like(ddt)
    dcs_b = torch.empty_like(ddt)
    dcse = torch.empty_like(ddt)
    BLOCK_P, BLOCK_N = _pow2(p), _pow2(n)
    n_sblk_max = triton.cdiv(Q, 32)   # partial buffers sized for the smallest row block
    split = _n_split(hpg, triton.cdiv(Q, 64) * b * nc * g, target=_SPLIT_TARGET)
    dB_sp = torch.empty(b, l, split, g, n, device=dev, dtype=torch.float32)
    dC_sp = torch.empty_like(dB_sp)
    dD_sp = torch.zeros(b * nc, n_sblk_max, h, p, device=dev, dtype=torch.float32) if D is not None else None
    grid = lambda M: (triton.cdiv(Q, M["BLOCK_S"]), b * nc, g * split)
    launch(_bwd_dx_db, grid, (p, n, Q, hpg // split, x.dtype),
        x, B, C, dy, dt_p, cs, seq, dstates, D if D is not None else x,
        dx, dB_sp, ddt, dcs_a, dcse, dD_sp if D is not None else ddt,
        l, h, p, n, hpg, hpg // split, split,
        *x.stride(), *dy.stride(), *dx.stride(), *B.stride(), stride_seq,
        Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, HAS_SEQ=has_seq, HAS_D=D is not None, F32=F32,
    )
    grid = lambda M: (triton.cdiv(Q, M["BLOCK_T"]), b * nc, g * split)
    launch(_bwd_dc, grid, (p, n, Q, hpg // split, x.dtype),
        x, B, C, dy, dt_p, cs, seq, prev, dC_sp, dcs_b,
        l, h, p, n, hpg, hpg // split, split,
        *x.stride(), *dy.stride(), *B.stride(), stride_seq,
        Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, BLOCK_HH=_pow2(hpg // split, 1), HAS_SEQ=has_seq, F32=F32,
    )
    del dstates

    # ---- the chunk-local reverse cumsum and the dt chain, one kernel per (chunk, head block) ----
    ddt_raw = torch.empty(dt_raw.shape, device=dev, dtype=dt_raw.dtype) if out_ddt is None else out_ddt
    dA_part = torch.empty(b * nc, h, device=dev, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part) if dt_bias is not None else dA_part
    lo, hi_ = dt_limit if dt_limit is not None else (0.0, 0.0)
    BH = min(_pow2(h, 1), 8 if Q > 128 else 16)
    _dt_bwd[(nc, b, triton.cdiv(h, BH))](
        dcs_a, dcs_b, dcse, dcs_end_sp, ddt, dt_p, A, dt_raw, dt_bias if dt_bias is not None else A,
        ddt_raw, dA_part, dbias_part,
        l, h, dcs_end_sp.shape[-1], *dt_raw.stride(), *ddt_raw.stride(), lo, hi_,
        Q=Q, BLOCK_H=BH, BLOCK_E=_pow2(dcs_end_sp.shape[-1], 1),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=dt_limit is not None,
    )
    dA = dA_part.sum(0).to(A.dtype)
    ddt_bias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None

    dB = _sum_into(dB_sp, B_dtype, out_dB)                                     # (B, L, G, N)
    dC = _sum_into(dC_sp, C_dtype, out_dC)
    dD = None
    if D is not None:
        dD = dD_sp.sum((0, 1))                                                     # (H, P)
        if D_in.dim() == 1:
            dD = dD.sum(-1)
        dD = dD.to(D_in.dtype)
    dinit = dinit.to(init.dtype) if init is not None else None
    return dx, ddt_raw, dA, dB, dC, dD, dz, ddt_bias, dinit


class _SSDChunked(torch.autograd.Function):
    """The kernels on any device (the interpreter's on the CPU). Models reach them through the
    custom op `hybridlab::ssd_chunked` (ssd.py) instead."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                initial_states, seq_idx, return_final_states):
        y, final, *saved = forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                                   initial_states, seq_idx)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *saved)
        ctx.options = chunk_size, dt_softplus, dt_limit
        ctx.return_final_states = return_final_states
        return (y, final) if return_final_states else y

    @staticmethod
    def backward(ctx, dy, *rest):
        dfinal = rest[0] if ctx.return_final_states else None
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = backward(dy, dfinal, *ctx.saved_tensors, *ctx.options)
        return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, None, None, dinit, None, None


def ssd_chunked(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=True,
                dt_limit=None, initial_states=None, seq_idx=None, return_final_states=False):
    """Triton chunked SSD scan; same contract as `ssd.ssd_chunked_ref` (differentiable)."""
    return _SSDChunked.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                             initial_states, seq_idx, return_final_states)


# --------------------------------------------------------------------------------------------
# One-token decode step
# --------------------------------------------------------------------------------------------
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
    H, P, N, HPG, dt_min, dt_max,
    stride_s_b, stride_s_h, stride_s_p, stride_s_n,
    stride_x_b, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h,
    stride_bc_b, stride_bc_g, stride_bc_n,
    stride_z_b, stride_z_h, stride_z_p,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
):
    # grid (cdiv(P, BLOCK_P), H, batch):  S <- exp(dt A) S + dt x B^T;  y = S C + D x;  y *= silu(z)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // HPG
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < P
    nmask = offs_n < N
    dt = tl.load(dt_ptr + b * stride_dt_b + h * stride_dt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(dt_bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(tl.minimum(dt, 20.0))))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dA = tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    x = tl.load(x_ptr + b * stride_x_b + h * stride_x_h + offs_p * stride_x_p, mask=pmask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * stride_bc_b + g * stride_bc_g + offs_n * stride_bc_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * stride_bc_b + g * stride_bc_g + offs_n * stride_bc_n, mask=nmask, other=0.0).to(tl.float32)
    sp = state_ptr + b * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :] * stride_s_n
    smask = pmask[:, None] & nmask[None, :]
    S = tl.load(sp, mask=smask, other=0.0)
    S = S * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, S, mask=smask)
    y = tl.sum(S * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=pmask, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
        y += Dv * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * stride_z_b + h * stride_z_h + offs_p * stride_z_p, mask=pmask, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * P * H + h * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=pmask)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None):
    """One decoding step in one launch; updates `state` (b, h, p, n) fp32 in place, returns y (b, h, p)."""
    b, h, p = x.shape
    g, n = B.shape[-2:]
    assert state.dtype == torch.float32 and h % g == 0
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    has_limit = dt_limit is not None and tuple(dt_limit) != (0.0, float("inf"))
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if has_limit else (0.0, 0.0)
    BLOCK_N = _pow2(n, 1)
    BLOCK_P = min(_pow2(p, 1), max(1, 4096 // BLOCK_N))
    zz = z if z is not None else x
    _ssd_step_kernel[(triton.cdiv(p, BLOCK_P), h, b)](
        state, x, dt, A, B, C, D if D is not None else x, zz, dt_bias if dt_bias is not None else dt, y,
        h, p, n, h // g, lo, hi,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *zz.stride(),
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_LIMIT=has_limit,
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
    )
    return y
