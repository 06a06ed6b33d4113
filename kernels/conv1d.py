"""Causal depthwise conv1d (+ SiLU), as in Mamba-2's x/B/C path, and its one-token update."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_impl, use_triton


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


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation="silu"):
    impl = triton_impl("conv1d_triton") if use_triton(x) else None
    if impl is not None:
        return impl.causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, activation=activation)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
    impl = triton_impl("conv1d_triton") if use_triton(x) else None
    if impl is not None:
        return impl.causal_conv1d_update(x, conv_state, weight, bias, activation=activation)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation=activation)
