"""RMSNorm and gated RMSNorm (Mamba-2's norm of the SSD output gated by z)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import triton_impl, use_triton


def rms_norm_ref(x, weight, eps=1e-5):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def gated_rms_norm_ref(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """x, z (..., d); weight (d,).

    norm_before_gate=False (mamba_ssm's Mamba-2 default): rmsnorm(x * silu(z)) * weight.
    norm_before_gate=True: rmsnorm(x) * weight * silu(z).
    With group_size, the mean square is taken over groups of that many channels.
    """
    d = x.shape[-1]
    group_size = group_size or d
    xf, zf = x.float(), z.float()
    if not norm_before_gate:
        xf = xf * F.silu(zf)
    xg = xf.view(*xf.shape[:-1], d // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.view_as(xf) * weight.float()
    if norm_before_gate:
        y = y * F.silu(zf)
    return y.to(x.dtype)


def rms_norm(x, weight, eps=1e-5):
    impl = triton_impl("norm_triton") if use_triton(x) else None
    if impl is not None:
        return impl.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def gated_rms_norm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    impl = triton_impl("norm_triton") if use_triton(x) else None
    if impl is not None:
        return impl.gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)
    return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)
