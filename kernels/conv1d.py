"""Causal depthwise conv1d (+ SiLU), as in Mamba-2's x/B/C path, and its one-token update."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import through_op, triton_impl, triton_on_cpu, use_triton


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, activation="silu"):
    """x (b, l, d); weight (d, k); bias (d,); seq_idx (b, l). Returns (b, l, d).

    Output t sees inputs t-k+1 .. t of its own sequence only (packed sequences do not leak).
    """
    b, l, d = x.shape
    k = weight.shape[1]
    xt = x.transpose(1, 2)  # (b, d, l)
    if seq_idx is None:
        y = F.conv1d(F.pad(xt, (k - 1, 0)), weight[:, None, :], bias, groups=d)
    else:
        # Sum the k taps by hand so each tap can be masked where it would cross a boundary.
        xp = F.pad(xt, (k - 1, 0))
        sp = F.pad(seq_idx, (k - 1, 0), value=-1)
        y = torch.zeros_like(xt, dtype=torch.float32)
        for j in range(k):  # tap j reads x[t - (k-1) + j]
            same = (sp[:, j : j + l] == seq_idx)[:, None, :]
            y = y + xp[:, :, j : j + l].float() * weight[None, :, j, None].float() * same
        if bias is not None:
            y = y + bias.float()[None, :, None]
        y = y.to(x.dtype)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return y.transpose(1, 2)


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation="silu"):
    """One token: x (b, d); conv_state (b, d, k) holds the last k inputs, updated in place."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state.float() * weight.float()[None]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The training kernels as the custom op `hybridlab::causal_conv1d` (one opaque node for
# torch.compile, forward and backward): Triton on CUDA; elsewhere the reference, or the kernels
# under Triton's interpreter when HYBRIDLAB_KERNELS=triton. Decoding's update stays a plain call.
# ----------------------------------------------------------------------------------------------
def _ct():
    return triton_impl("conv1d_triton")


def _silu_flag(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unknown activation {activation!r}")
    return activation is not None


@torch.library.custom_op("hybridlab::causal_conv1d", mutates_args=())
def _op(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor], silu: bool) -> Tensor:
    """y (b, l, d), contiguous, in x's dtype; weight (d, k). The backward keeps only the inputs."""
    if triton_on_cpu():
        return _ct().forward(x, weight, bias, seq_idx, silu)
    return causal_conv1d_ref(x, weight, bias, seq_idx, "silu" if silu else None).contiguous()


@_op.register_kernel("cuda")
def _op_cuda(x, weight, bias, seq_idx, silu):
    return _ct().forward(x, weight, bias, seq_idx, silu)


@_op.register_fake
def _op_fake(x, weight, bias, seq_idx, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("hybridlab::causal_conv1d_backward", mutates_args=())
def _op_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                 silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias), each in its input's dtype; dbias is empty without a bias."""
    if triton_on_cpu():
        dx, dw, db = _ct().backward(dy, x, weight, bias, seq_idx, silu)
    else:  # the reference's gradients (torch.func: plain autograd does not run inside an op)
        act = "silu" if silu else None
        if bias is None:
            _, vjp = torch.func.vjp(lambda x, w: causal_conv1d_ref(x, w, None, seq_idx, act), x, weight)
            (dx, dw), db = vjp(dy), None
        else:
            _, vjp = torch.func.vjp(lambda x, w, b: causal_conv1d_ref(x, w, b, seq_idx, act), x, weight, bias)
            dx, dw, db = vjp(dy)
        dx = dx.contiguous()
    return dx, dw, db if db is not None else x.new_empty(0)


@_op_backward.register_kernel("cuda")
def _op_backward_cuda(dy, x, weight, bias, seq_idx, silu):
    dx, dw, db = _ct().backward(dy, x, weight, bias, seq_idx, silu)
    return dx, dw, db if db is not None else x.new_empty(0)


@_op_backward.register_fake
def _op_backward_fake(dy, x, weight, bias, seq_idx, silu):
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = _op_backward(dy, x, weight, bias, seq_idx, ctx.silu)
    return dx, dw, db if bias is not None else None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation="silu"):
    """x (b, l, d); weight (d, k) or nn.Conv1d's (d, 1, k); bias (d,); seq_idx (b, l).
    Returns (b, l, d) in x's dtype."""
    if use_triton(x):
        if not through_op():  # eager: the autograd.Function (less host time than the op)
            return _ct().causal_conv1d(x, weight, bias, seq_idx, activation)
        # under torch.compile: the op, one node; nothing below that compile cannot trace
        silu = _silu_flag(activation)
        if weight.dim() == 3:
            weight = weight.squeeze(1)
        if seq_idx is not None:  # once here, so the forward and the backward share it
            seq_idx = seq_idx.to(torch.int32).contiguous()
        return _op(x, weight, bias, seq_idx, silu)
    return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    impl = triton_impl("conv1d_triton") if use_triton(x) else None
    if impl is not None:
        return impl.causal_conv1d_update(x, conv_state, weight, bias, activation=activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation=activation)
