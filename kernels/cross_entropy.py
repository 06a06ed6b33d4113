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

from .dispatch import triton_impl, use_triton


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


def linear_cross_entropy(h, weight, targets, chunk: int = 8192, ignore_index: int = -100):
    """Mean CE of softmax(h @ weight.T) against targets, never holding all logits at once.

    Under autocast, the chunk matmuls run in the autocast dtype like a plain F.linear would.
    """
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    impl = triton_impl("cross_entropy_triton") if use_triton(h) else None
    with torch.autocast(h.device.type, enabled=False):
        if impl is not None:
            return impl.fused_linear_cross_entropy(h, weight.to(h.dtype), targets, chunk, ignore_index)
        return _LinearCrossEntropy.apply(h, weight, targets, chunk, ignore_index)
