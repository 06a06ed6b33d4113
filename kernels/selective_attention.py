"""Attention for the queries a SAL selected: causal, optionally windowed, GQA.

Full causal attention and sliding-window attention are the special case "every query
selected", so `attention`, `swa` and `sal` all call `selective_attention`.

    key j is visible to query i  iff  j <= i  and  i - j < window  and  kv_mask[j]
                                      and  seq_idx[j] == seq_idx[i]

The window is measured in original token positions, not among selected tokens. A query
always sees itself, so no row of the softmax is empty. Unselected queries output zeros.
`seq_idx` (b, L) int numbers the documents packed in a row (0, 0, 1, 1, 1, 2, ...): each is a
contiguous run of one id (ids non-decreasing, as packing makes them), so a query sees only
keys of its own document, from the document's first token on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import through_op, triton_impl, triton_on_cpu, use_triton


def _visibility(L, window, q_mask, kv_mask, device, seq_idx=None):
    """(b or 1, 1, L, L) bool: which keys each query may attend to."""
    i = torch.arange(L, device=device)
    rel = i[:, None] - i[None, :]  # query - key
    vis = rel >= 0
    if window is not None:
        vis = vis & (rel < window)
    vis = vis[None, None]
    if kv_mask is not None:
        vis = vis & (kv_mask[:, None, None, :] | torch.eye(L, dtype=torch.bool, device=device))
    if seq_idx is not None:  # packed documents: nothing crosses a change of id
        vis = vis & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
    return vis


def selective_attention_ref(q, k, v, q_mask=None, kv_mask=None, window=None, scale=None,
                            seq_idx=None):
    """q (b, L, hq, d); k, v (b, L, hkv, d); masks (b, L) bool; seq_idx (b, L) int.
    Returns (b, L, hq, d)."""
    b, L, hq, d = q.shape
    hkv = k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    vis = _visibility(L, window, q_mask, kv_mask, q.device, seq_idx)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, L, d)
    if hkv != hq:  # GQA: each K/V head serves hq // hkv query heads
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=vis, scale=scale)
    o = o.transpose(1, 2)  # (b, L, hq, d)
    if q_mask is not None:
        o = o * q_mask[:, :, None, None].to(o.dtype)
    return o


def selective_attention_decode_ref(q, k_cache, v_cache, slot_pos, pos, window=None, scale=None):
    """One query per sequence against a cache.

    q (b, hq, d); k_cache, v_cache (b, S, hkv, d); slot_pos (b, S) int64, the original position
    held in each slot (-1: empty); pos (b,) the query's position. Returns (b, hq, d).
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    valid = (slot_pos >= 0) & (slot_pos <= pos[:, None])
    if window is not None:
        valid = valid & (slot_pos > pos[:, None] - window)
    kt = k_cache.transpose(1, 2)  # (b, hkv, S, d)
    vt = v_cache.transpose(1, 2)
    if hkv != hq:
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), kt.float()) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing valid gives zeros
    return torch.einsum("bhs,bhsd->bhd", p, vt.float()).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# The Triton kernels as a torch.library custom op: torch.compile sees one opaque node (no graph
# break, no tracing into Triton) and `setup_context`/`backward` below as its autograd. On CUDA
# the op runs the Triton kernels; elsewhere the reference (its extra outputs zeros), or the
# kernels under Triton's interpreter when HYBRIDLAB_KERNELS=triton.
# ----------------------------------------------------------------------------------------------
def _sat():
    return triton_impl("selective_attention_triton")


@torch.library.custom_op("hybridlab::selective_attention", mutates_args=())
def _op(q: Tensor, k: Tensor, v: Tensor, q_mask: Optional[Tensor], kv_mask: Optional[Tensor],
        window: Optional[int], scale: Optional[float], seq_idx: Optional[Tensor]
        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(o, lse, sel_pos, rank): the output and what the backward keeps (see
    selective_attention_triton.forward)."""
    if triton_on_cpu():
        return _sat().forward(q, k, v, q_mask, kv_mask, window, scale, seq_idx)
    o = selective_attention_ref(q, k, v, q_mask, kv_mask, window, scale, seq_idx)
    lse, sel_pos, rank = (torch.zeros_like(t) for t in _saved_like(q, q_mask))
    return o, lse, sel_pos, rank


@_op.register_kernel("cuda")
def _op_cuda(q, k, v, q_mask, kv_mask, window, scale, seq_idx):
    return _sat().forward(q, k, v, q_mask, kv_mask, window, scale, seq_idx)


def _saved_like(q, q_mask):
    """Empty tensors shaped as the op's lse, sel_pos, rank."""
    b, L, hq, _ = q.shape
    n = L + 1 if q_mask is not None else 1
    return (q.new_empty(b, hq, max(L, 1), dtype=torch.float32),
            *(q.new_empty((b, n) if q_mask is not None else (n,), dtype=torch.int32) for _ in range(2)))


@_op.register_fake
def _op_fake(q, k, v, q_mask, kv_mask, window, scale, seq_idx):
    return (torch.empty_like(q), *_saved_like(q, q_mask))


@torch.library.custom_op("hybridlab::selective_attention_backward", mutates_args=())
def _op_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, sel_pos: Tensor,
                 rank: Tensor, q_mask: Optional[Tensor], kv_mask: Optional[Tensor], window: Optional[int],
                 scale: Optional[float], seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); k's and v's in q's dtype."""
    if triton_on_cpu():
        return _sat().backward(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, window, scale, seq_idx)
    # the reference's gradients; an op's implementation runs below autograd, torch.func does not
    ref = lambda q, k, v: selective_attention_ref(q, k, v, q_mask, kv_mask, window, scale, seq_idx)  # noqa: E731
    _, vjp = torch.func.vjp(ref, q, k, v)
    dq, dk, dv = vjp(do)
    return dq, dk.to(q.dtype), dv.to(q.dtype)


@_op_backward.register_kernel("cuda")
def _op_backward_cuda(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, window, scale, seq_idx):
    return _sat().backward(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, window, scale, seq_idx)


@_op_backward.register_fake
def _op_backward_fake(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, window, scale, seq_idx):
    # k and v come back in q's dtype, as the kernels compute them; autograd casts to k's, v's
    return torch.empty_like(q), torch.empty_like(k, dtype=q.dtype), torch.empty_like(v, dtype=q.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, q_mask, kv_mask, window, scale, seq_idx = inputs
    o, lse, sel_pos, rank = output
    ctx.save_for_backward(q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, seq_idx)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, do, _dlse, _dsel_pos, _drank):
    q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, seq_idx = ctx.saved_tensors
    dq, dk, dv = _op_backward(do, q, k, v, o, lse, sel_pos, rank, q_mask, kv_mask, ctx.window, ctx.scale,
                              seq_idx)
    return dq, dk, dv, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def triton_head_dim(d: int) -> bool:
    """Whether the Triton kernels take head dim d (their tiles need a power of two >= 16);
    other widths run the reference on every device."""
    return d >= 16 and d & (d - 1) == 0


def selective_attention(q, k, v, q_mask=None, kv_mask=None, window=None, scale=None,
                        seq_idx=None):
    if use_triton(q) and triton_head_dim(q.shape[-1]):
        if not through_op():  # eager: the autograd.Function (less host time than the op)
            return _sat().selective_attention(q, k, v, q_mask, kv_mask, window, scale, seq_idx)
        # under torch.compile: the op, one node; nothing below that compile cannot trace
        window = None if window is None else int(window)
        scale = None if scale is None else float(scale)
        return _op(q, k, v, q_mask, kv_mask, window, scale, seq_idx)[0]
    return selective_attention_ref(q, k, v, q_mask, kv_mask, window, scale, seq_idx)


def selective_attention_decode(q, k_cache, v_cache, slot_pos, pos, window=None, scale=None):
    impl = triton_impl("selective_attention_triton") if use_triton(q) and triton_head_dim(q.shape[-1]) else None
    if impl is not None and hasattr(impl, "selective_attention_decode"):
        return impl.selective_attention_decode(q, k_cache, v_cache, slot_pos, pos, window, scale)
    return selective_attention_decode_ref(q, k_cache, v_cache, slot_pos, pos, window, scale)


def attention_by_position(q, k, v, q_pos, k_pos, k_valid, window=None, scale=None):
    """Attention where visibility comes from explicit positions: for prefilling a chunk of
    queries against a cache (ring-buffer slots in any order) plus the chunk's own keys.
    The production path on every device (SDPA with an explicit mask; no Triton kernel yet).

    q (b, T, hq, d); k, v (b, S, hkv, d); q_pos (b, T); k_pos (b, S);
    k_valid (b, S) bool, or (b, T, S) for a validity per query.
    Key j is visible to query i iff k_valid[(i,) j], k_pos[j] <= q_pos[i], q_pos[i] - k_pos[j] < window.
    A query with nothing visible outputs zeros.
    """
    b, T, hq, d = q.shape
    hkv = k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    rel = q_pos[:, :, None] - k_pos[:, None, :]  # (b, T, S)
    vis = (k_valid if k_valid.dim() == 3 else k_valid[:, None, :]) & (rel >= 0)
    if window is not None:
        vis = vis & (rel < window)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, ., d)
    if hkv != hq:
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
    empty = ~vis.any(-1)  # (b, T)
    vis = vis | empty[..., None]  # keep softmax finite; those rows are zeroed below
    o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=vis[:, None], scale=scale)
    o = o.transpose(1, 2)
    return o.masked_fill(empty[:, :, None, None], 0.0)
