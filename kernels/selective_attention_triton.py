"""Selective (sparse, sliding-window) attention in Triton: forward, backward and decode.

Same function as `selective_attention_ref` (see `selective_attention.py`):

    key j is visible to query i  iff  j <= i  and  i - j < window  and  (kv_mask[j] or j == i)
                                      and  seq_idx[j] == seq_idx[i]

and queries outside `q_mask` output zeros. Layout is the projections' (b, L, h, d); nothing
is transposed or copied.

How the work is laid out
------------------------
* Compaction. A small kernel over (blocks of L, batch) turns `q_mask` (b, L) into `rank`
  (b, L+1) = how many selected queries lie before each position, and `sel_pos` (b, L+1), the
  positions of the selected queries in order (the first `rank[b, L]` entries are valid): each
  block adds the count of the earlier blocks (summed from the mask, or for long L from a
  first pass of per-block counts) to a local tl.cumsum. No host synchronisation: the
  attention grids are sized for L queries per batch and tiles past the batch's count exit
  at once (after their share of the zeroing below).
* Forward. A program owns BLOCK_M consecutive *compacted* queries of one (batch, head). It
  gathers their q rows straight from (b, L, h, d), loops over the keys in
  [first_pos - window + 1, last_pos] (original positions) with an fp32 online softmax, and
  scatters its output rows into the (b, L, h, d) output. The output is not zero-filled: the
  program of grid tile t also writes zeros to the unselected rows among *positions*
  [t * BLOCK_M, (t + 1) * BLOCK_M) (`_zero_unselected`), so the grid's cdiv(L, BLOCK_M)
  programs per (batch, head) zero every unselected row exactly once, and never touch a
  selected row (written only by the attention store of the tile that owns it). The key loop
  has four segments (`_key_segments`): keys before every row's own position but outside some
  row's window (the window edge: one compare per score), keys past the first row's position
  but inside every row's window (the diagonal: one compare), the keys every query of the tile
  sees (no mask) in the middle, and, only when a tile spans nearly a whole window, keys that
  can cross both edges (three compares). One-sided tests instead of both edges everywhere
  are faster on the H200 (docs/measurements/README.md, fifth session).
* Backward. dq: the same query-major loop. dk/dv: a key-major pass; a program owns BLOCK_N keys
  of one (batch, kv head) and loops over the compacted queries with position in
  [n0, n0 + BLOCK_N - 1 + window), found in O(1) from `rank`, for every query head of its GQA
  group, so dk/dv need no atomics and are deterministic. Every key block is written (zeros
  where nobody looks), so dk/dv need no zero fill; the dq kernel zeroes the unselected rows of
  dq the way the forward does for o.
* No `q_mask` is the dense case (every query selected): positions equal compacted indices and
  no index arrays are read (constexpr DENSE). This is the full-causal / sliding-window path.
* Packed documents (`seq_idx`, constexpr HAS_SEQ): for non-decreasing ids, "same document" is
  "key at or after the query's document start" (forward, dq) or "query before the key's
  document end" (dk/dv), so the host turns seq_idx into doc_start / doc_end (b, L) and each
  query's (or key's) window is cut there (`_doc_windows`): the document mask is tested where the
  window edge is, at no extra cost per score, and the key (query) ranges stop at the tile's
  document bounds, so blocks of other documents are skipped, not masked.
* Decode (flash-decoding): the cache's slots are split among programs, each with one (batch,
  query head) and one range of slots, so a long cache streams at memory speed even at batch 1;
  a second small kernel merges the splits' softmax states.

Scores are kept in the log2 domain (q . k * scale * log2 e) so the softmax uses exp2.
Masked scores are set to a large finite negative number, not -inf: a row that has seen only
masked keys so far then carries harmless garbage that is wiped (alpha = 0) by its first visible
key, and every row has one (its own position), so no NaN can appear.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .launch import launch
from .selective_attention import triton_head_dim

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NEG = tl.constexpr(-1.0e30)  # "masked" score; see the module docstring for why it is finite
# Which visibility tests a key segment needs (see `_key_segments`): one compare per score for
# the window edge or the diagonal alone, three for both.
_NO_MASK = tl.constexpr(0)
_WINDOW_EDGE = tl.constexpr(1)
_DIAGONAL = tl.constexpr(2)
_BOTH_EDGES = tl.constexpr(3)
_LOG2E = 1.4426950408889634


# HYBRIDLAB_AUTOTUNE=0: first config only (quick GPU test runs: every config is a compile)
_TUNE = os.environ.get("HYBRIDLAB_AUTOTUNE", "1") != "0"


def _configs(gpu_configs, interp_config):
    """Autotune on the GPU; exactly one config under the interpreter (more than one fails there)."""
    if _INTERPRET:
        return [triton.Config(interp_config, num_warps=1, num_stages=1)]
    return [triton.Config(dict(BLOCK_M=c[0], BLOCK_N=c[1]), num_warps=c[2], num_stages=c[3],
                          maxnreg=c[4] if len(c) > 4 else None)
            for c in (gpu_configs if _TUNE else gpu_configs[:1])]


# (BLOCK_M queries, BLOCK_N keys, warps, stages[, register cap]); few on purpose: each is a
# compile. The masked path picks 64-query tiles (they span fewer positions, so the key range
# wastes less), the dense path 128-query tiles. The register caps buy occupancy for the
# latency-bound masked kernels (dk/dv most). Timings, and the configs tried and dropped:
# docs/measurements/README.md. HYBRIDLAB_AUTOTUNE=0 runs each list's first config: dk/dv's is
# the masked path's pick, so GPU test runs cover it.
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3), (64, 32, 4, 4),
                (64, 64, 4, 3, 128)]
_DQ_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3)]
_DKDV_CONFIGS = [(16, 64, 4, 3, 128), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3, 168), (16, 64, 4, 4, 128)]
_INTERP_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)
_TUNE_KEY = ["L", "window", "HEAD_DIM", "DENSE", "HAS_KV_MASK", "HAS_SEQ"]
# Lengths, windows and head counts are only bounds: specialising on their divisibility would
# recompile every kernel for each odd length or window without making anything faster.
_NO_SPEC = ["L", "H", "GROUP", "window"]


def _tuner_bench(fn, quantiles):
    """Shorter timing per config than the default (25 + 100 ms): many configs x shapes."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def _autotune(configs):
    return triton.autotune(configs=configs, key=_TUNE_KEY, do_bench=_tuner_bench)


@triton.jit
def _mm(a, b, acc, DOT_FP32: tl.constexpr):
    """acc + a @ b. The interpreter's tl.dot is wrong on 16-bit operands: widen them there."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _wide(rows, OFF64: tl.constexpr):
    """Row offsets in int32 unless one sequence's tensor exceeds 2**31 elements (OFF64):
    int64 address tensors double the registers of every gathered tile and make the kernels
    spill."""
    if OFF64:
        out = rows.to(tl.int64)
    else:
        out = rows
    return out


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _score_tile(q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl, start_n, L, window, qk_scale,
                MASK: tl.constexpr, HAS_KV_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
                OFF64: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N): their k, v tiles (BN, D) and the scores q k^T (BM, BN)
    in the log2 domain, with every invisible (query, key) pair set to _NEG. MASK says which
    edges the caller's segment can cross (`_key_segments`); only those are tested. Shared by
    the forward and the dq pass."""
    offs_d = tl.arange(0, HEAD_DIM)
    cols = start_n + tl.arange(0, BLOCK_N)  # (BN,) key positions
    k_ptrs = k_base + _wide(cols, OFF64)[:, None] * stride_kl + offs_d[None, :]
    v_ptrs = v_base + _wide(cols, OFF64)[:, None] * stride_vl + offs_d[None, :]
    if MASK >= _DIAGONAL:  # the last block may run past L; window-edge keys lie before p_first
        col_ok = cols < L
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)  # (BN, D)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = _mm(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), DOT_FP32)  # (BM, BN)
    qk = qk * qk_scale  # log2 domain; scaled in fp32 after the dot, not by rounding q
    if MASK == _WINDOW_EDGE:  # keys before every row's own position: no diagonal here
        vis = cols[None, :] > (pos_m - window)[:, None]
        if HAS_KV_MASK:
            vis = vis & (tl.load(kvm_base + cols) != 0)[None, :]
        qk = tl.where(vis, qk, _NEG)
    elif MASK == _DIAGONAL:  # keys inside every row's window
        vis = cols[None, :] <= pos_m[:, None]
        if HAS_KV_MASK:
            kvm = tl.load(kvm_base + cols, mask=col_ok, other=0) != 0
            vis = vis & (kvm[None, :] | (cols[None, :] == pos_m[:, None]))
        qk = tl.where(vis, qk, _NEG)
    elif MASK == _BOTH_EDGES:
        rel = pos_m[:, None] - cols[None, :]  # query - key, original positions
        vis = (rel >= 0) & (cols[None, :] > (pos_m - window)[:, None])  # window: scalar or (BM,)
        if HAS_KV_MASK:
            kvm = tl.load(kvm_base + cols, mask=col_ok, other=0) != 0
            vis = vis & (kvm[None, :] | (rel == 0))
        qk = tl.where(vis, qk, _NEG)
    elif HAS_KV_MASK:
        kvm = tl.load(kvm_base + cols) != 0
        qk = tl.where(kvm[None, :], qk, _NEG)
    return k, v, qk


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl,
               start, end, L, window, qk_scale,
               MASK: tl.constexpr, HAS_KV_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
               OFF64: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online softmax over keys [start, end), a segment with the edges MASK says."""
    for start_n in range(start, end, BLOCK_N):
        k, v, qk = _score_tile(q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl, start_n,
                               L, window, qk_scale, MASK, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tile_rows(SEL_POS, RANK, b, tile, L, DENSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """For compacted query tile `tile` of batch b: (count, first row, row ids, row valid,
    row positions, first position, last position). Padding rows repeat the last valid row so
    every row has a visible key; they are never stored."""
    if DENSE:
        count = L
    else:
        count = tl.load(RANK + b * (L + 1) + L)
    m0 = tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # compacted row ids
    row_ok = offs_m < count
    last = tl.minimum(m0 + BLOCK_M, count) - 1
    offs_c = tl.minimum(offs_m, last)
    if DENSE:
        pos_m = offs_c
        p_first = m0
        p_last = last
    else:
        pos_base = SEL_POS + b * (L + 1)  # sel_pos rows have a spare column
        pos_m = tl.load(pos_base + offs_c)
        p_first = tl.load(pos_base + m0)
        p_last = tl.load(pos_base + last)
    return count, m0, offs_m, row_ok, pos_m, p_first, p_last


@triton.jit
def _key_segments(p_first, p_last, w_first, w_last, BLOCK_N: tl.constexpr):
    """Split the tile's key range [lo, hi) (whole BLOCK_N blocks from lo) into
        [lo, w_end)   window edge only: keys before p_first, so causal for every row
        [w_end, b1)   both edges (empty unless the tile spans nearly a window)
        [b1, b2)      no mask: inside every row's window and before p_first
        [b2, hi)      diagonal only: keys >= last_pos - w_last + 1, inside every window.
    w_first, w_last: the first and the last row's window (the smallest window start is the
    first row's, the largest the last row's; with packed documents a row's window is cut at
    its document's start, see `_doc_windows`)."""
    lo = tl.maximum(p_first - w_first + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = p_last + 1
    full_lo = tl.maximum(p_last - w_last + 1, 0)
    b1 = tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo)
    d0 = tl.maximum((p_first // BLOCK_N) * BLOCK_N, lo)
    b2 = tl.maximum(d0, b1)
    w_end = tl.minimum(b1, d0)
    e_end = tl.minimum(b1, hi)
    return lo, w_end, e_end, b1, b2, hi


@triton.jit
def _doc_windows(DOC_START, b64, L, pos_m, p_first, p_last, window, HAS_SEQ: tl.constexpr):
    """(window of each row, of the first row, of the last row). Packed documents (HAS_SEQ):
    a row sees keys from max(pos - window + 1, its document's first position) on, so its
    window shrinks to min(window, pos - doc_start + 1). The document mask then costs nothing
    of its own: it is tested where the window edge is (`_score_tile`), and the first row's
    window puts the tile's key range past the keys of earlier documents (`_key_segments`)."""
    if HAS_SEQ:
        base = DOC_START + b64 * L
        win_m = tl.minimum(window, pos_m - tl.load(base + pos_m) + 1)  # (BM,)
        w_first = tl.minimum(window, p_first - tl.load(base + p_first) + 1)
        w_last = tl.minimum(window, p_last - tl.load(base + p_last) + 1)
    else:
        win_m = window
        w_first = window
        w_last = window
    return win_m, w_first, w_last


@triton.jit
def _zero_unselected(OUT, RANK, b, h, s_b, s_l, s_h, L, tile,
                     OFF64: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Write zeros to the rows of OUT (b, L, h, d) whose *position* lies in
    [tile * BLOCK_M, (tile + 1) * BLOCK_M) and whose query is not selected
    (rank[p + 1] == rank[p]). The grid has cdiv(L, BLOCK_M) tiles per (batch, head), so the
    position blocks of its programs tile [0, L): every unselected row is written exactly once,
    by one program, and never a selected row, which only the attention stores write.
    Partitioning by position (not by the gaps between a compacted tile's selected queries)
    bounds every program's share at BLOCK_M rows whatever the selection, and puts most of the
    zeroing on the programs past the count, which have no attention to do."""
    offs_p = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = offs_p < L
    rank_base = RANK + b.to(tl.int64) * (L + 1)
    r0 = tl.load(rank_base + offs_p, mask=p_ok, other=0)
    r1 = tl.load(rank_base + offs_p + 1, mask=p_ok, other=0)
    zero_row = p_ok & (r1 == r0)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = (OUT + b.to(tl.int64) * s_b + h * s_h + _wide(offs_p, OFF64)[:, None] * s_l
            + offs_d[None, :])
    tl.store(ptrs, tl.zeros([BLOCK_M, HEAD_DIM], OUT.dtype.element_ty), mask=zero_row[:, None])


@_autotune(_configs(_FWD_CONFIGS, _INTERP_BLOCKS))
@triton.jit(do_not_specialize=_NO_SPEC)
def _sel_attn_fwd(Q, K, V, O, LSE, SEL_POS, RANK, KVM, DOC_START,
                  sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
                  L, H, GROUP, window, qk_scale,
                  HEAD_DIM: tl.constexpr, DENSE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
                  HAS_SEQ: tl.constexpr, DOT_FP32: tl.constexpr, OFF64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # GQA: the kv head serving this query head
    if not DENSE:  # o is not zero-filled: this program zeroes the unselected rows of its
        # position block [tile * BM, (tile + 1) * BM), whether or not it also owns a tile of
        # compacted queries below (programs past the count still do this, then exit)
        _zero_unselected(O, RANK, b, h, sob, sol, soh, L, tile, OFF64, BLOCK_M, HEAD_DIM)
    count, m0, offs_m, row_ok, pos_m, p_first, p_last = _tile_rows(
        SEL_POS, RANK, b, tile, L, DENSE, BLOCK_M)
    if m0 >= count:  # this batch has fewer selected queries than the grid allows for
        return
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    pos64 = _wide(pos_m, OFF64)
    # gather the tile's q rows straight from (b, L, hq, d)
    q = tl.load(Q + b64 * sqb + h * sqh + pos64[:, None] * sql + offs_d[None, :])  # (BM, D)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    kvm_base = KVM + b64 * L

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # with packed documents `window` is from here on per row (BM,), cut at each document start
    window, w_first, w_last = _doc_windows(DOC_START, b64, L, pos_m, p_first, p_last, window, HAS_SEQ)
    lo, w_end, e_end, b1, b2, hi = _key_segments(p_first, p_last, w_first, w_last, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, skl, svl, lo, w_end,
                               L, window, qk_scale, _WINDOW_EDGE, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, skl, svl, w_end, e_end,
                               L, window, qk_scale, _BOTH_EDGES, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, skl, svl, b1, b2,
                               L, window, qk_scale, _NO_MASK, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, pos_m, k_base, v_base, kvm_base, skl, svl, b2, hi,
                               L, window, qk_scale, _DIAGONAL, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)

    acc = acc / l_i[:, None]
    # scatter the output rows back to their original positions
    o_ptrs = O + b64 * sob + h * soh + pos64[:, None] * sol + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    # log-sum-exp (log2 domain) per compacted row, for the backward: LSE (b, hq, L)
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl,
              start, end, L, window, qk_scale,
              MASK: tl.constexpr, HAS_KV_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
              OFF64: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        k, v, qk = _score_tile(q, pos_m, k_base, v_base, kvm_base, stride_kl, stride_vl, start_n,
                               L, window, qk_scale, MASK, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
        p = tl.math.exp2(qk - lse[:, None])  # 0 where invisible (_NEG)
        dp = _mm(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), DOT_FP32)
        ds = p * (dp - delta[:, None])  # dL/d(score), up to the softmax scale
        dq = _mm(ds.to(k.dtype), k, dq, DOT_FP32)
    return dq


@_autotune(_configs(_DQ_CONFIGS, _INTERP_BLOCKS))
@triton.jit(do_not_specialize=_NO_SPEC)
def _sel_attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, SEL_POS, RANK, KVM, DOC_START,
                     sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sdb, sdl, sdh,
                     sgb, sgl, sgh,
                     L, H, GROUP, window, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, DENSE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
                     HAS_SEQ: tl.constexpr, DOT_FP32: tl.constexpr, OFF64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if not DENSE:  # dq is not zero-filled: unselected rows of this position block, as in fwd
        _zero_unselected(DQ, RANK, b, h, sgb, sgl, sgh, L, tile, OFF64, BLOCK_M, HEAD_DIM)
    count, m0, offs_m, row_ok, pos_m, p_first, p_last = _tile_rows(
        SEL_POS, RANK, b, tile, L, DENSE, BLOCK_M)
    if m0 >= count:
        return
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    pos64 = _wide(pos_m, OFF64)
    q = tl.load(Q + b64 * sqb + h * sqh + pos64[:, None] * sql + offs_d[None, :])
    do = tl.load(DO + b64 * sdb + h * sdh + pos64[:, None] * sdl + offs_d[None, :])
    offs_r = tl.minimum(offs_m, count - 1)  # padding rows repeat the last row, like pos_m
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_r)
    # delta_i = o_i . do_i, here rather than in a kernel of its own (one launch fewer); the
    # dk/dv kernel, launched after this one, reads it from DELTA (b, hq, L) by compacted row
    o = tl.load(O + b64 * sob + h * soh + pos64[:, None] * sol + offs_d[None, :])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, delta, mask=row_ok)
    k_base = K + b64 * skb + hk * skh
    v_base = V + b64 * svb + hk * svh
    kvm_base = KVM + b64 * L

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # with packed documents `window` is from here on per row (BM,), as in the forward
    window, w_first, w_last = _doc_windows(DOC_START, b64, L, pos_m, p_first, p_last, window, HAS_SEQ)
    lo, w_end, e_end, b1, b2, hi = _key_segments(p_first, p_last, w_first, w_last, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, skl, svl, lo, w_end,
                   L, window, qk_scale, _WINDOW_EDGE, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, skl, svl, w_end, e_end,
                   L, window, qk_scale, _BOTH_EDGES, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, skl, svl, b1, b2,
                   L, window, qk_scale, _NO_MASK, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, pos_m, k_base, v_base, kvm_base, skl, svl, b2, hi,
                   L, window, qk_scale, _DIAGONAL, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_N, HEAD_DIM)
    dq_ptrs = DQ + b64 * sgb + h * sgh + pos64[:, None] * sgl + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, kvm, offs_n, q_base, do_base, lse_base, delta_base, pos_base,
                sql, sdl, start, end, c_end, window, qk_scale,
                MASKED: tl.constexpr, DENSE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
                DOT_FP32: tl.constexpr, OFF64: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Accumulate over compacted queries [start, end) (rows >= c_end are padding when MASKED).
    Tiles are transposed, (BN keys, BM queries), so dk/dv accumulate without transposes."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(start, end, BLOCK_M):
        offs_c = start_m + tl.arange(0, BLOCK_M)  # compacted query ids
        if MASKED:
            row_ok = offs_c < c_end
            if DENSE:
                pos = offs_c
            else:
                pos = tl.load(pos_base + offs_c, mask=row_ok, other=0)
            pos64 = _wide(pos, OFF64)
            q = tl.load(q_base + pos64[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + pos64[:, None] * sdl + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_c, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_c, mask=row_ok, other=0.0)
        else:
            if DENSE:
                pos = offs_c
            else:
                pos = tl.load(pos_base + offs_c)
            pos64 = _wide(pos, OFF64)
            q = tl.load(q_base + pos64[:, None] * sql + offs_d[None, :])
            do = tl.load(do_base + pos64[:, None] * sdl + offs_d[None, :])
            lse = tl.load(lse_base + offs_c)
            delta = tl.load(delta_base + offs_c)
        qkT = _mm(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], tl.float32), DOT_FP32)  # (BN, BM)
        qkT = qkT * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            rel = pos[None, :] - offs_n[:, None]  # query - key
            # window: scalar, or (BN,) per key with packed documents
            vis = (rel >= 0) & (pos[None, :] < (offs_n + window)[:, None]) & row_ok[None, :]
            if HAS_KV_MASK:
                vis = vis & (kvm[:, None] | (rel == 0))
            pT = tl.where(vis, pT, 0.0)
        elif HAS_KV_MASK:
            pT = tl.where(kvm[:, None], pT, 0.0)
        dv = _mm(pT.to(do.dtype), do, dv, DOT_FP32)
        dpT = _mm(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], tl.float32), DOT_FP32)
        dsT = pT * (dpT - delta[None, :])
        dk = _mm(dsT.to(q.dtype), q, dk, DOT_FP32)
    return dk, dv


@_autotune(_configs(_DKDV_CONFIGS, _INTERP_BLOCKS))
@triton.jit(do_not_specialize=_NO_SPEC + ["HKV"])
def _sel_attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, SEL_POS, RANK, KVM, DOC_END,
                       sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
                       skgb, skgl, skgh, svgb, svgl, svgh,
                       L, H, HKV, GROUP, window, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, DENSE: tl.constexpr, HAS_KV_MASK: tl.constexpr,
                       HAS_SEQ: tl.constexpr, DOT_FP32: tl.constexpr, OFF64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    nblk = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    b64 = b.to(tl.int64)
    n0 = nblk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # key positions
    key_ok = offs_n < L
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b64 * skb + hk * skh + _wide(offs_n, OFF64)[:, None] * skl + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)  # (BN, D)
    v = tl.load(V + b64 * svb + hk * svh + _wide(offs_n, OFF64)[:, None] * svl + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)
    if HAS_KV_MASK:
        kvm = tl.load(KVM + b64 * L + offs_n, mask=key_ok, other=0) != 0
    else:
        kvm = key_ok

    # Queries that can see a key of this block have positions in [n0, n0 + BN - 1 + window).
    # rank[t] = number of selected queries before position t turns those bounds into ranges of
    # compacted rows: [c_lo, c_diag) can hit the diagonal, [c_diag, c_win) sees every key of
    # the block, [c_win, c_hi) is cut by the window edge.
    t_diag = tl.minimum(n0 + BLOCK_N, L)
    t_win = tl.minimum(n0 + window, L)
    t_hi = tl.minimum(n0 + BLOCK_N - 1 + window, L)
    if HAS_SEQ:
        # Packed documents: a key is seen by queries before its document's end only, so every
        # query is read by the key blocks of its own document alone, and `window` is from here
        # on per key (BN,): min(window, doc_end - key), tested where the window edge is.
        end_base = DOC_END + b64 * L
        t_win = tl.minimum(t_win, tl.load(end_base + n0))
        t_hi = tl.minimum(t_hi, tl.load(end_base + t_diag - 1))
        window = tl.minimum(window, tl.load(end_base + offs_n, mask=key_ok, other=0) - offs_n)
    if DENSE:
        c_lo = n0
        c_diag = t_diag
        c_win = t_win
        c_hi = t_hi
    else:
        rank_base = RANK + b * (L + 1)
        c_lo = tl.load(rank_base + n0)
        c_diag = tl.load(rank_base + t_diag)
        c_win = tl.load(rank_base + t_win)
        c_hi = tl.load(rank_base + t_hi)
    b1 = c_lo + tl.cdiv(c_diag - c_lo, BLOCK_M) * BLOCK_M  # aligned so the middle is whole tiles
    b2 = tl.maximum(b1, c_lo + ((c_win - c_lo) // BLOCK_M) * BLOCK_M)
    s1 = tl.minimum(b1, c_hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    pos_base = SEL_POS + b64 * (L + 1)
    for g in range(0, GROUP):  # every query head that reads this kv head
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int64)
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdb + h * sdh
        lse_base = LSE + bh * L
        delta_base = DELTA + bh * L
        dk, dv = _dkdv_inner(dk, dv, k, v, kvm, offs_n, q_base, do_base, lse_base, delta_base,
                             pos_base, sql, sdl, c_lo, s1, c_hi, window, qk_scale,
                             True, DENSE, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_inner(dk, dv, k, v, kvm, offs_n, q_base, do_base, lse_base, delta_base,
                             pos_base, sql, sdl, b1, b2, c_hi, window, qk_scale,
                             False, DENSE, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_inner(dk, dv, k, v, kvm, offs_n, q_base, do_base, lse_base, delta_base,
                             pos_base, sql, sdl, b2, c_hi, c_hi, window, qk_scale,
                             True, DENSE, HAS_KV_MASK, DOT_FP32, OFF64, BLOCK_M, HEAD_DIM)
    # every key block is written, zeros where no query looks: dk/dv need no zero fill
    tl.store(DK + b64 * skgb + hk * skgh + _wide(offs_n, OFF64)[:, None] * skgl + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b64 * svgb + hk * svgh + _wide(offs_n, OFF64)[:, None] * svgl + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


# ----------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sel_attn_decode(Q, KC, VC, SLOT_POS, POS, M_PART, L_PART, ACC_PART,
                     sqb, sqh, skb, sks, skh, svb, svs, svh, spb,
                     S, H, GROUP, window, qk_scale, SPLIT_LEN, NSPLIT,
                     HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query (b, h) against slots [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) of the cache
    (b, S, hkv, d): the partial softmax state (running max m, sum l, unnormalised output acc),
    for `_sel_attn_decode_combine`. Memory bound, so plain reductions, no tensor cores."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    q = tl.load(Q + b64 * sqb + h * sqh + offs_d).to(tl.float32) * qk_scale  # (D,)
    pos = tl.load(POS + b)
    m_i = tl.full([1], _NEG, tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, S)
    for s0 in range(lo, hi, BLOCK_S):
        slots = s0 + offs_s
        in_split = slots < hi
        sp = tl.load(SLOT_POS + b64 * spb + slots, mask=in_split, other=-1)
        valid = in_split & (sp >= 0) & (sp <= pos) & (sp > pos - window)
        k = tl.load(KC + b64 * skb + hk * skh + slots.to(tl.int64)[:, None] * sks + offs_d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)  # (BS, D)
        v = tl.load(VC + b64 * svb + hk * svh + slots.to(tl.int64)[:, None] * svs + offs_d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], 1), _NEG)  # (BS,)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.where(valid, tl.math.exp2(s - m_new), 0.0)  # explicit zero: a split may be empty
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    part = bh.to(tl.int64) * NSPLIT + split
    tl.store(M_PART + part + tl.arange(0, 1), m_i)
    tl.store(L_PART + part + tl.arange(0, 1), l_i)
    tl.store(ACC_PART + part * HEAD_DIM + offs_d, acc)


@triton.jit
def _sel_attn_decode_combine(M_PART, L_PART, ACC_PART, O, sob, soh, H, NSPLIT,
                             HEAD_DIM: tl.constexpr, SPLIT_PAD: tl.constexpr):
    """Merge the splits' partial softmax states of one (b, h) into its output row."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    part = bh.to(tl.int64) * NSPLIT + offs
    live = offs < NSPLIT
    m = tl.load(M_PART + part, mask=live, other=_NEG)
    l = tl.load(L_PART + part, mask=live, other=0.0)
    acc = tl.load(ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, tl.math.exp2(m - m_max), 0.0)  # an empty split weighs nothing
    l_sum = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0)
    out = tl.where(l_sum > 0, out / tl.maximum(l_sum, 1e-30), 0.0)  # nothing visible: zeros
    tl.store(O + b.to(tl.int64) * sob + h * soh + offs_d, out.to(O.dtype.element_ty))


# Compaction: q_mask (b, L) -> rank (b, L+1), sel_pos (b, L+1), in parallel over (blocks of L,
# batch) and without host synchronisation. A program owns BLOCK positions of one batch row: it
# needs the number of selected queries before its block (its prefix), then a local tl.cumsum.
# Two ways to get the prefix, chosen on the host from L alone:
# * single pass (L <= _COMPACT_ONE_PASS_MAX_L): each program sums the mask bytes before its block
#   itself, CHUNK bytes per step. Total reads grow as L^2 / BLOCK, but up to 32K positions the
#   last block reads at most 31 KiB (<= 8 steps of 4 KiB, L2-resident: ~1-3 us of latency),
#   which is cheaper than a second launch (~2 us gap plus a second tiny kernel). This covers
#   the taipan shapes (L 4K-16K) with one launch of <= 32 programs per row.
# * two passes (longer L): `_compact_count_kernel` writes each block's count to a small (b,
#   nblk) buffer, then `_compact_kernel` sums the earlier blocks' counts (nblk <= 256 ints per
#   row at L = 1M with 4096-position blocks: one step) before its local cumsum. The mask is
#   read twice (2 bytes a position, against the 8 bytes of rank + sel_pos written), so this
#   runs at memory speed for any L, where the single pass would read L^2 / BLOCK bytes (64 MiB
#   a row at L = 1M).
# A sequential loop over L (one program per row) costs ~L / BLOCK dependent steps and leaves
# the GPU idle at batch 1-8.
_COMPACT_ONE_PASS_MAX_L = 32768


@triton.jit(do_not_specialize=["L", "NBLK"])
def _compact_count_kernel(MASK, COUNTS, L, NBLK, BLOCK: tl.constexpr):
    """COUNTS[b, j] = selected queries in positions [j * BLOCK, (j + 1) * BLOCK) of row b."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(MASK + b.to(tl.int64) * L + offs, mask=offs < L, other=0) != 0
    tl.store(COUNTS + b.to(tl.int64) * NBLK + j, tl.sum(m.to(tl.int32), 0))


@triton.jit(do_not_specialize=["L", "NBLK"])
def _compact_kernel(MASK, COUNTS, SEL_POS, RANK, L, NBLK, FROM_COUNTS: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Positions [j * BLOCK, (j + 1) * BLOCK) of batch row b: rank (selected queries before
    each position) and the positions of the selected ones at their compacted index. The
    prefix (selected queries before the block) comes from COUNTS (FROM_COUNTS) or from
    summing the mask before the block."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    mask_base = MASK + b64 * L
    rank_base = RANK + b64 * (L + 1)
    pos_base = SEL_POS + b64 * (L + 1)
    offs_c = tl.arange(0, CHUNK)
    prefix = 0
    if FROM_COUNTS:
        for c0 in range(0, j, CHUNK):  # counts of blocks 0 .. j-1
            cnt = tl.load(COUNTS + b64 * NBLK + c0 + offs_c, mask=c0 + offs_c < j, other=0)
            prefix += tl.sum(cnt, 0)
    else:
        n = j * BLOCK
        for c0 in range(0, n, CHUNK):  # mask bytes 0 .. j * BLOCK - 1
            mb = tl.load(mask_base + c0 + offs_c, mask=c0 + offs_c < n, other=0) != 0
            prefix += tl.sum(mb.to(tl.int32), 0)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    m = (tl.load(mask_base + offs, mask=ok, other=0) != 0).to(tl.int32)
    incl = tl.cumsum(m, 0) + prefix  # selected queries up to and including each position
    if j == 0:
        tl.store(rank_base, 0)
    tl.store(rank_base + offs + 1, incl, mask=ok)
    tl.store(pos_base + incl - 1, offs, mask=ok & (m != 0))


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _compact(q_mask: torch.Tensor, L: int):
    """q_mask (b, L) bool -> sel_pos (b, L+1) int32 (the selected positions in order; entries
    past the count are never read), rank (b, L+1) int32 (selected queries before each
    position; rank[:, L] = count). Parallel over (blocks of L, batch), no host
    synchronisation; see `_COMPACT_ONE_PASS_MAX_L` for the one- or two-pass choice."""
    b = q_mask.shape[0]
    dev = q_mask.device
    sel_pos = torch.empty(b, L + 1, device=dev, dtype=torch.int32)
    if b * L == 0:
        return sel_pos, torch.zeros(b, L + 1, device=dev, dtype=torch.int32)
    rank = torch.empty(b, L + 1, device=dev, dtype=torch.int32)
    mask = _as_bytes(q_mask)
    one_pass = L <= _COMPACT_ONE_PASS_MAX_L
    if _INTERPRET:  # tiny blocks: several blocks and prefix steps even at test sizes
        block, chunk, warps = 16, 16, 1
    elif one_pass:
        block, chunk, warps = min(triton.next_power_of_2(max(L, 16)), 1024), 4096, 8
    else:
        block, chunk, warps = 4096, 1024, 8
    nblk = triton.cdiv(L, block)
    if one_pass:
        counts = rank  # unused
    else:
        counts = torch.empty(b, nblk, device=dev, dtype=torch.int32)
        _compact_count_kernel[(nblk, b)](mask, counts, L, nblk, BLOCK=block, num_warps=warps)
        if not _INTERPRET:
            chunk = min(chunk, triton.next_power_of_2(nblk))
    _compact_kernel[(nblk, b)](mask, counts, sel_pos, rank, L, nblk, FROM_COUNTS=not one_pass,
                               BLOCK=block, CHUNK=chunk, num_warps=warps)
    return sel_pos, rank


def _empty_like(t):
    """Uninitialised output buffers. The kernels must write every element (the tests swap in
    a NaN-filled allocation here to catch a row left unwritten)."""
    return torch.empty_like(t)


def _as_bytes(mask):
    """(b, L) bool as uint8 without a copy (same itemsize), contiguous."""
    return mask.contiguous().view(torch.uint8)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _needs_int64(L, *tensors):
    """True when a row offset (position * row stride) within one sequence may pass 2**31."""
    return L * max(t.stride(1) for t in tensors) + max(t.stride(2) * t.shape[2] for t in tensors) >= 2 ** 31


def _check_head_dim(d):
    if not triton_head_dim(d):
        raise ValueError(f"selective_attention (Triton): head dim {d} must be a power of two >= 16")


def _doc_bounds(seq_idx, L):
    """seq_idx (b, L) -> doc_start, doc_end (b, L) int32: the first position of each token's
    document and one past its last (a document is a run of one id). The forward and dq
    kernels cut each query's window at its doc_start, the dk/dv kernel each key's at its
    doc_end. A few elementwise ops and scans, no host synchronisation."""
    seq = seq_idx.to(torch.int32)
    pos = torch.arange(L, device=seq.device, dtype=torch.int32).expand_as(seq)
    first = torch.ones_like(seq, dtype=torch.bool)
    first[:, 1:] = seq[:, 1:] != seq[:, :-1]  # a document starts here
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]  # a document ends here
    doc_start = torch.where(first, pos, 0).cummax(1).values
    doc_end = torch.where(last, pos + 1, L).flip(1).cummin(1).values.flip(1)
    return doc_start.to(torch.int32).contiguous(), doc_end.to(torch.int32).contiguous()


def _prepare(q, k, v, window, scale):
    """The kernels' view of the arguments: K/V in q's dtype, unit stride along the head dim,
    an int window (>= L: full causal attention) and a float scale."""
    b, L, hq, d = q.shape
    _check_head_dim(d)
    if hq % k.shape[2]:
        raise ValueError(f"GQA needs hq % hkv == 0, got hq={hq}, hkv={k.shape[2]}")
    q, k, v = (_last_dim_contiguous(t.to(q.dtype)) for t in (q, k, v))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    window = L if window is None else max(1, min(int(window), L))
    return q, k, v, window, scale


def _kv_bytes(kv_mask, device):
    if kv_mask is None:
        return torch.empty(1, device=device, dtype=torch.uint8)  # unused
    return _as_bytes(kv_mask.to(device=device, dtype=torch.bool))


def forward(q, k, v, q_mask=None, kv_mask=None, window=None, scale=None, seq_idx=None):
    """The forward kernels. Returns o (b, L, hq, d) and what `backward` needs: lse (b, hq, L)
    fp32 by compacted row, and sel_pos, rank (b, L+1) int32 (1-element placeholders when
    q_mask is None)."""
    b, L, hq, d = q.shape
    hkv = k.shape[2]
    q, k, v, window, scale = _prepare(q, k, v, window, scale)
    dense = q_mask is None
    if dense:
        # unused; two tensors, as a custom op's outputs may not alias each other
        sel_pos, rank = (torch.zeros(1, device=q.device, dtype=torch.int32) for _ in range(2))
    else:
        sel_pos, rank = _compact(q_mask.to(device=q.device, dtype=torch.bool), L)
    o = _empty_like(q)  # every row is written: attention rows, and zeros for unselected rows
    lse = torch.empty(b, hq, max(L, 1), device=q.device, dtype=torch.float32)
    if b * L * hq == 0:
        return o, lse, sel_pos, rank
    has_kv = kv_mask is not None
    kvm = _kv_bytes(kv_mask, q.device)
    has_seq = seq_idx is not None
    doc_start = _doc_bounds(seq_idx.to(q.device), L)[0] if has_seq else kvm  # unused if not has_seq
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), b * hq)  # noqa: E731
    launch(_sel_attn_fwd, grid, (L, window, d, dense, has_kv, has_seq, q.dtype),
           q, k, v, o, lse, sel_pos, rank, kvm, doc_start,
           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
           L, hq, hq // hkv, window, scale * _LOG2E,
           HEAD_DIM=d, DENSE=dense, HAS_KV_MASK=has_kv, HAS_SEQ=has_seq,
           DOT_FP32=_INTERPRET, OFF64=_needs_int64(L, q, k, v))
    return o, lse, sel_pos, rank


def backward(do, q, k, v, o, lse, sel_pos, rank, q_mask=None, kv_mask=None, window=None, scale=None,
             seq_idx=None):
    """The backward kernels, from `forward`'s outputs. Returns dq, dk, dv (k's and v's dtype is
    q's, as in the forward)."""
    b, L, hq, d = q.shape
    hkv = k.shape[2]
    q, k, v, window, scale = _prepare(q, k, v, window, scale)
    do = _last_dim_contiguous(do.to(q.dtype))
    dq = _empty_like(q)  # _sel_attn_bwd_dq writes every row, zeros for unselected
    dk = _empty_like(k)  # every key block is written by the dk/dv kernel
    dv = _empty_like(v)
    if b * L * hq == 0:
        return dq, dk.zero_(), dv.zero_()
    dense, has_kv, has_seq = q_mask is None, kv_mask is not None, seq_idx is not None
    kvm = _kv_bytes(kv_mask, q.device)
    doc_start, doc_end = _doc_bounds(seq_idx.to(q.device), L) if has_seq else (kvm, kvm)
    off64 = _needs_int64(L, q, k, v, do)
    delta = _empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
    tune_key = (L, window, d, dense, has_kv, has_seq, q.dtype)
    grid_q = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), b * hq)  # noqa: E731
    launch(_sel_attn_bwd_dq, grid_q, tune_key,
           q, k, v, o, do, dq, lse, delta, sel_pos, rank, kvm, doc_start,
           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3],
           *dq.stride()[:3],
           L, hq, hq // hkv, window, scale * _LOG2E, scale,
           HEAD_DIM=d, DENSE=dense, HAS_KV_MASK=has_kv, HAS_SEQ=has_seq,
           DOT_FP32=_INTERPRET, OFF64=off64)
    grid_k = lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), b * hkv)  # noqa: E731
    launch(_sel_attn_bwd_dkdv, grid_k, tune_key,
           q, k, v, do, dk, dv, lse, delta, sel_pos, rank, kvm, doc_end,
           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
           *dk.stride()[:3], *dv.stride()[:3],
           L, hq, hkv, hq // hkv, window, scale * _LOG2E, scale,
           HEAD_DIM=d, DENSE=dense, HAS_KV_MASK=has_kv, HAS_SEQ=has_seq,
           DOT_FP32=_INTERPRET, OFF64=off64)
    return dq, dk, dv


class _SelectiveAttention(torch.autograd.Function):
    """The kernels on any device (the interpreter's on the CPU). Models reach them through the
    custom op `hybridlab::selective_attention` (selective_attention.py) instead."""

    @staticmethod
    def forward(ctx, q, k, v, q_mask, kv_mask, window, scale, seq_idx):
        o, lse, sel_pos, rank = forward(q, k, v, q_mask, kv_mask, window, scale, seq_idx)
        ctx.save_for_backward(q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, seq_idx)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, seq_idx = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, ctx.window, ctx.scale,
                              seq_idx)
        return dq, dk, dv, None, None, None, None, None


def selective_attention(q, k, v, q_mask=None, kv_mask=None, window=None, scale=None, seq_idx=None):
    """q (b, L, hq, d); k, v (b, L, hkv, d); q_mask, kv_mask (b, L) bool or None; seq_idx
    (b, L) int or None: packed documents, runs of one id that nothing attends across.
    Returns (b, L, hq, d): attention for the selected queries, zeros elsewhere."""
    return _SelectiveAttention.apply(q, k, v, q_mask, kv_mask, window, scale, seq_idx)


def selective_attention_decode(q, k_cache, v_cache, slot_pos, pos, window=None, scale=None):
    """q (b, hq, d); k_cache, v_cache (b, S, hkv, d); slot_pos (b, S) int64 (-1: empty);
    pos (b,). Returns (b, hq, d)."""
    b, hq, d = q.shape
    S, hkv = k_cache.shape[1], k_cache.shape[2]
    _check_head_dim(d)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    q, k_cache, v_cache = (_last_dim_contiguous(t) for t in (q, k_cache, v_cache))
    slot_pos = slot_pos.to(torch.int64).contiguous()
    pos = pos.to(device=q.device, dtype=torch.int64).contiguous()
    # no window: anything at or before pos; 2**62 keeps pos - window from overflowing
    window = 2 ** 62 if window is None else int(window)
    o = _empty_like(q)
    if b * hq == 0:
        return o
    block_s = 16 if _INTERPRET else 128
    # Split-K (flash-decoding): one (b, h) alone cannot pull a long cache at memory speed, so
    # the slots are split until the grid fills the GPU a few times over (or splits get short).
    n_split, split_len = _decode_splits(b * hq, S, block_s, q.device)
    m_part = torch.empty(b * hq * n_split, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(b * hq * n_split, d, device=q.device, dtype=torch.float32)
    _sel_attn_decode[(b * hq, n_split)](
        q, k_cache, v_cache, slot_pos, pos, m_part, l_part, acc_part,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        slot_pos.stride(0),
        S, hq, hq // hkv, window, scale * _LOG2E, split_len, n_split,
        HEAD_DIM=d, BLOCK_S=block_s, num_warps=1 if _INTERPRET else 4)
    _sel_attn_decode_combine[(b * hq,)](
        m_part, l_part, acc_part, o, o.stride(0), o.stride(1), hq, n_split,
        HEAD_DIM=d, SPLIT_PAD=triton.next_power_of_2(n_split), num_warps=1 if _INTERPRET else 4)
    return o


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_splits(rows: int, S: int, block_s: int, device) -> tuple[int, int]:
    """(number of splits, slots per split): about 4 programs per SM, at least 4 key blocks per
    split (shorter splits pay more in partials than they gain), at most 256 splits. Under the
    interpreter, splits of 2 blocks so the tests cover the combine."""
    blocks = triton.cdiv(max(S, 1), block_s)
    if _INTERPRET:
        per_split = 2
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = min(256, max(1, triton.cdiv(4 * sms, rows)))
        per_split = max(4, triton.cdiv(blocks, want))
    n_split = triton.cdiv(blocks, per_split)
    return n_split, per_split * block_s
