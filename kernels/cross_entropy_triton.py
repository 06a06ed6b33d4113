"""LM head + cross-entropy on the GPU: the gradients are made in the forward pass.

Per chunk of tokens: logits = h_c W^T (one matmul, in the input dtype), then one Triton
program per row reads its logits twice (online log-sum-exp, then the gradient) and overwrites
them in place with d loss / d logits = (softmax - onehot) / n_valid; two matmuls turn that into
grad h_c and a chunk's share of grad W. The backward only scales those by the incoming
gradient. Against the torch version in `cross_entropy.py` (fp32 copies of every chunk of
logits, separate exp / subtract / scale / cast passes, and the head matmul recomputed in the
backward) this moves ~12 instead of ~50 bytes per logit and does three vocab-sized matmuls
instead of four.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _ce_rows_kernel(logits_ptr, targets_ptr, inv_count_ptr, loss_ptr, V, stride_row, ignore_index,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row: loss_ptr[row] = (lse - logit[target]) or 0 when ignored; with WRITE_GRAD the
    row becomes (softmax - onehot(target)) * inv_count (zeros when ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):  # online log-sum-exp, one running (max, sum) per lane
        x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        empty = m_new == float("-inf")  # lanes past V in every block so far: keep (-inf, 0)
        ref = tl.where(empty, 0.0, m_new)  # never -inf - -inf (NaN) below
        s = s * tl.exp(tl.where(empty, 0.0, m) - ref) + tl.exp(x - ref)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))  # s = 0 on empty lanes: exp(-inf) = 0
    picked = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(inv_count_ptr), 0.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


# One program per row, 32 warps, 16384 columns per load: on the H200 a chunk of 8192 rows at
# vocab 128256 (bf16) took 1.74 ms, against 2.27 ms with 8 warps and 4096 columns (the launch
# before the eleventh session). Going through the rows in one program per SM instead (so the
# rows being read at once fit in L2) gained only 2% more (1.70 ms): docs/measurements/README.md.
_WARPS, _BLOCK_V = 32, 16384


def _mean_loss(h, weight, targets, chunk, ignore_index, grad_h=None, grad_w=None):
    """Mean CE over non-ignored targets, chunk by chunk. Given grad_h (N, d) and/or grad_w (V, d)
    fp32 buffers, also fills them with the gradients of that mean (one pass, no recompute)."""
    write_grad = grad_h is not None or grad_w is not None
    inv_count = 1.0 / (targets != ignore_index).sum().clamp_min(1).float()   # device scalar, no sync
    losses = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk]
        logits = F.linear(hc, weight)                                         # (c, V), h's dtype
        _ce_rows_kernel[(hc.shape[0],)](
            logits, targets[s:s + chunk], inv_count, losses[s:s + chunk], weight.shape[0],
            logits.stride(0), ignore_index, WRITE_GRAD=write_grad, BLOCK_V=64 if _INTERPRET else _BLOCK_V,
            num_warps=1 if _INTERPRET else _WARPS)
        if grad_h is not None:                                                # logits now hold d loss / d logits
            torch.matmul(logits, weight, out=grad_h[s:s + chunk])
        if grad_w is not None:
            _accumulate(grad_w, logits.t(), hc)                               # fp32 += (V, c) @ (c, d)
    return losses.sum() * inv_count


_FP32_EPILOGUE = True  # until addmm(..., out_dtype=float32) turns out missing from this torch build


def _accumulate(acc, a, b):
    """acc (fp32) += a @ b for a, b in bf16/fp16. On CUDA the sum happens in the matmul's fp32
    epilogue (cuBLAS reads acc as C with beta = 1): no product rounded to bf16, and no separate
    mixed-dtype add over the (V, d) buffer, which cost 0.37 ms a chunk at vocab 128256
    (taipan-190m, tenth session). Elsewhere, or without the op: a product and an add."""
    global _FP32_EPILOGUE
    if _FP32_EPILOGUE and acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _FP32_EPILOGUE = False
    acc += a @ b


def forward(h, weight, targets, chunk, ignore_index, need_grad_h=True, need_grad_w=True):
    """The loss and, as asked, its gradients, in one pass: (loss, grad_h, grad_w). grad_h is in
    h's dtype (N, d), grad_w fp32 (V, d), each None when not asked for. h and targets must be
    contiguous."""
    grad_h = torch.empty_like(h) if need_grad_h else None
    grad_w = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need_grad_w else None
    loss = _mean_loss(h, weight, targets, chunk, ignore_index, grad_h, grad_w)
    return loss, grad_h, grad_w


def backward(grad_out, grad_h, grad_w, weight_dtype):
    """The gradients `forward` made, scaled by the loss's incoming gradient (None stays None)."""
    gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
    gw = (grad_w * grad_out).to(weight_dtype) if grad_w is not None else None
    return gh, gw


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """The kernels on any device (the interpreter's on the CPU). Models reach them through the
    custom op `hybridlab::linear_cross_entropy` (cross_entropy.py) instead."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        ctx.weight_dtype = weight.dtype
        loss, grad_h, grad_w = forward(h, weight, targets, chunk, ignore_index, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (*backward(grad_out, grad_h, grad_w, ctx.weight_dtype), None, None, None)


def fused_linear_cross_entropy(h, weight, targets, chunk: int = 8192, ignore_index: int = -100):
    """h (N, d) and weight (V, d) in one dtype; targets (N,). Mean CE over non-ignored targets.

    Without autograd (torch.no_grad, or nothing requiring grad) only the loss is computed: an
    autograd Function's forward cannot tell, since needs_input_grad follows requires_grad alone.
    """
    h, targets = h.contiguous(), targets.contiguous()
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _mean_loss(h, weight, targets, chunk, ignore_index)
    return _FusedLinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index)
