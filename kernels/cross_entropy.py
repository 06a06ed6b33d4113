"""LM head + cross-entropy without materialising the (tokens, vocab) logits.

At vocab 128256 the logits of B8 x L4096 tokens are 4.2G elements: 8 GB in bf16, 17 GB as
fp32 for the softmax, and again for their gradient. Here the head is applied chunk by chunk;
the backward recomputes each chunk's logits and turns them straight into gradients for the
hidden states and the head weight, so peak memory is one chunk of logits. On CUDA the fused
version in `cross_entropy_triton.py` runs instead (gradients made in the forward pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import autocast_dtype, through_op, triton_impl, triton_on_cpu, use_triton


def linear_cross_entropy_ref(h, weight, targets, ignore_index=-100):
    """h (N, d); weight (V, d); targets (N,). Mean CE over targets != ignore_index."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        n = h.shape[0]
        valid = targets != ignore_index
        count = valid.sum().clamp_min(1)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        lse_all = torch.empty(n, device=h.device, dtype=torch.float32)
        for s in range(0, n, chunk):
            logits = F.linear(h[s:s + chunk], weight).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[s:s + chunk] = lse
            t = targets[s:s + chunk]
            picked = logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
            loss += ((lse - picked) * valid[s:s + chunk]).sum()
        ctx.save_for_backward(h, weight, targets, lse_all, count)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse_all, count = ctx.saved_tensors
        chunk = ctx.chunk
        valid = targets != ctx.ignore_index
        scale = grad_out / count
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            logits = F.linear(hc, weight).float()
            # d loss / d logits = (softmax - onehot) * valid / count
            g = torch.exp(logits - lse_all[s:s + chunk, None])
            t = targets[s:s + chunk]
            g[torch.arange(g.shape[0], device=g.device), t.clamp_min(0)] -= 1.0
            g *= (valid[s:s + chunk].float() * scale)[:, None]
            g = g.to(hc.dtype if hc.dtype != torch.float32 else torch.float32)
            if grad_h is not None:
                grad_h[s:s + chunk] = (g @ weight.to(g.dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ hc.to(g.dtype)).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


# ----------------------------------------------------------------------------------------------
# The fused version as the custom op `hybridlab::linear_cross_entropy`: one opaque node for
# torch.compile. Its forward returns the loss and the gradients the kernels make with it (as
# asked: need_grad_h / need_grad_w, from requires_grad, so frozen weights and evaluation make
# none); its backward scales them by the loss's incoming gradient, two elementwise products
# (no kernel, so no backward op). Triton on CUDA; elsewhere the reference with its gradients
# written out, or the kernels under Triton's interpreter when HYBRIDLAB_KERNELS=triton.
# ----------------------------------------------------------------------------------------------
def _cet():
    return triton_impl("cross_entropy_triton")


def _fused(h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w):
    loss, grad_h, grad_w = _cet().forward(h.contiguous(), weight, targets.contiguous(), chunk, ignore_index,
                                          need_grad_h, need_grad_w)
    # a gradient not asked for: an empty tensor of its own (outputs may not alias each other)
    return (loss, grad_h if grad_h is not None else h.new_empty(0),
            grad_w if grad_w is not None else h.new_empty(0))


@torch.library.custom_op("hybridlab::linear_cross_entropy", mutates_args=())
def _op(h: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int, need_grad_h: bool,
        need_grad_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_h, grad_w): the mean CE (fp32 scalar) and its gradients for h (h's dtype)
    and weight (fp32), each empty when not asked for. weight in h's dtype."""
    if triton_on_cpu():
        return _fused(h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w)
    # The reference, its gradients written out (no torch.func here: opcheck's schema check cannot
    # see through its wrappers): d loss / d logits = (softmax - onehot) * valid / n_valid.
    logits = F.linear(h, weight).float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index)
    if not (need_grad_h or need_grad_w):
        return loss, h.new_empty(0), h.new_empty(0)
    valid = targets != ignore_index
    g = torch.softmax(logits, dim=-1)
    g[valid, targets[valid]] -= 1.0
    g = (g * (valid / valid.sum().clamp_min(1))[:, None]).to(h.dtype)
    return (loss, g @ weight if need_grad_h else h.new_empty(0),
            (g.t() @ h).float() if need_grad_w else h.new_empty(0))


@_op.register_kernel("cuda")
def _op_cuda(h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w):
    return _fused(h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w)


@_op.register_fake
def _op_fake(h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w):
    return (h.new_empty((), dtype=torch.float32),
            h.new_empty(h.shape) if need_grad_h else h.new_empty(0),
            h.new_empty(weight.shape, dtype=torch.float32) if need_grad_w else h.new_empty(0))


def _setup_context(ctx, inputs, output):
    h, weight, targets, chunk, ignore_index, need_grad_h, need_grad_w = inputs
    _, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w)
    ctx.need_grad_h, ctx.need_grad_w, ctx.weight_dtype = need_grad_h, need_grad_w, weight.dtype


def _backward(ctx, dloss, _dgrad_h, _dgrad_w):
    grad_h, grad_w = ctx.saved_tensors
    gh = grad_h * dloss.to(grad_h.dtype) if ctx.need_grad_h else None
    gw = (grad_w * dloss).to(ctx.weight_dtype) if ctx.need_grad_w else None
    return gh, gw, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(h, weight, targets, chunk: int = 8192, ignore_index: int = -100):
    """Mean CE of softmax(h @ weight.T) against targets, never holding all logits at once.

    Under autocast, the chunk matmuls run in the autocast dtype like a plain F.linear would.
    """
    dtype = autocast_dtype(h)
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        if use_triton(h):
            if not through_op():  # eager: the autograd.Function (less host time than the op)
                return _cet().fused_linear_cross_entropy(h, weight.to(h.dtype), targets, chunk, ignore_index)
            # under torch.compile: the op, one node; nothing below that compile cannot trace
            weight = weight.to(h.dtype)
            grad = torch.is_grad_enabled()  # the gradients are made in the forward only if needed
            return _op(h, weight, targets, int(chunk), int(ignore_index), grad and h.requires_grad,
                       grad and weight.requires_grad)[0]
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index)
