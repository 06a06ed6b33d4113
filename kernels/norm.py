"""RMSNorm and gated RMSNorm (Mamba-2's norm of the SSD output gated by z)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import through_op, triton_impl, triton_on_cpu, use_triton


def rms_norm_ref(x, weight, eps=1e-5, out_dtype=None):
    """x (..., d); weight (d,). The output in out_dtype, else x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(out_dtype or x.dtype)


def gated_rms_norm_ref(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False, out_dtype=None):
    """x, z (..., d); weight (d,).

    norm_before_gate=False (mamba_ssm's Mamba-2 default): rmsnorm(x * silu(z)) * weight.
    norm_before_gate=True: rmsnorm(x) * weight * silu(z).
    With group_size, the mean square is taken over groups of that many channels.
    z=None: no gate, a (grouped) RMSNorm. The output in out_dtype, else x's dtype.
    """
    d = x.shape[-1]
    group_size = group_size or d
    xf = x.float()
    zf = z.float() if z is not None else None
    if zf is not None and not norm_before_gate:
        xf = xf * F.silu(zf)
    xg = xf.view(*xf.shape[:-1], d // group_size, group_size)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.view_as(xf) * weight.float()
    if zf is not None and norm_before_gate:
        y = y * F.silu(zf)
    return y.to(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------
# The kernels as the custom op `hybridlab::gated_rms_norm` (z None: plain or grouped RMSNorm):
# one opaque node for torch.compile, forward and backward. Triton on CUDA; elsewhere the
# reference (rstd zeros), or the kernels under Triton's interpreter when HYBRIDLAB_KERNELS=triton.
# ----------------------------------------------------------------------------------------------
def _nt():
    return triton_impl("norm_triton")


@torch.library.custom_op("hybridlab::gated_rms_norm", mutates_args=())
def _op(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: Optional[int],
        norm_before_gate: bool, out_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    """(y, rstd): y contiguous in out_dtype (None: x's); rstd (..., d // group_size) fp32 for
    the backward."""
    if triton_on_cpu():
        return _nt().forward(x, z, weight, eps, group_size, norm_before_gate, out_dtype)
    y = gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate, out_dtype).contiguous()
    return y, _rstd_like(x, group_size).zero_()


@_op.register_kernel("cuda")
def _op_cuda(x, z, weight, eps, group_size, norm_before_gate, out_dtype):
    return _nt().forward(x, z, weight, eps, group_size, norm_before_gate, out_dtype)


def _rstd_like(x, group_size):
    d = x.shape[-1]
    return x.new_empty((*x.shape[:-1], d // (group_size or d)), dtype=torch.float32)


@_op.register_fake
def _op_fake(x, z, weight, eps, group_size, norm_before_gate, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), _rstd_like(x, group_size)


@torch.library.custom_op("hybridlab::gated_rms_norm_backward", mutates_args=())
def _op_backward(dy: Tensor, x: Tensor, z: Optional[Tensor], weight: Tensor, rstd: Tensor, eps: float,
                 group_size: Optional[int], norm_before_gate: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dz, dweight), each in its input's dtype; dz is empty without z. eps is for the
    reference (the kernels read rstd). dy may be in a narrower dtype than x (out_dtype)."""
    if triton_on_cpu():
        dx, dz, dw = _nt().backward(dy, x, z, weight, rstd, group_size, norm_before_gate)
        return dx, dz if dz is not None else x.new_empty(0), dw
    # the reference's gradients (torch.func: plain autograd does not run inside an op)
    ref = lambda x, w, *z: gated_rms_norm_ref(x, z[0] if z else None, w, eps, group_size,  # noqa: E731
                                              norm_before_gate)
    _, vjp = torch.func.vjp(ref, x, weight, *([z] if z is not None else []))
    dx, dw, *dz = vjp(dy.to(x.dtype))
    return dx.contiguous(), dz[0].contiguous() if dz else x.new_empty(0), dw


@_op_backward.register_kernel("cuda")
def _op_backward_cuda(dy, x, z, weight, rstd, eps, group_size, norm_before_gate):
    dx, dz, dw = _nt().backward(dy, x, z, weight, rstd, group_size, norm_before_gate)
    return dx, dz if dz is not None else x.new_empty(0), dw


@_op_backward.register_fake
def _op_backward_fake(dy, x, z, weight, rstd, eps, group_size, norm_before_gate):
    dz = z.new_empty(z.shape) if z is not None else x.new_empty(0)
    return x.new_empty(x.shape), dz, torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate, _out_dtype = inputs
    ctx.save_for_backward(x, z, weight, output[1])
    ctx.eps, ctx.group_size, ctx.norm_before_gate = eps, group_size, norm_before_gate


def _backward(ctx, dy, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    dx, dz, dw = _op_backward(dy, x, z, weight, rstd, ctx.eps, ctx.group_size, ctx.norm_before_gate)
    return dx, dz if z is not None else None, dw, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight, eps=1e-5, out_dtype=None):
    """out_dtype: the output's dtype (None: x's). A norm whose output only feeds matmuls under
    autocast writes it in their dtype at once, instead of in x's to be cast by each of them."""
    if use_triton(x):
        if not through_op():  # eager: the autograd.Function (less host time than the op)
            return _nt().rms_norm(x, weight, eps, out_dtype)
        # under torch.compile: the op, one node; nothing below that compile cannot trace
        return _op(x, None, weight, float(eps), None, False, out_dtype)[0]
    return rms_norm_ref(x, weight, eps, out_dtype)


def gated_rms_norm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    if use_triton(x):
        if not through_op():  # eager: the autograd.Function (less host time than the op)
            return _nt().gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)
        # under torch.compile: the op, one node; nothing below that compile cannot trace
        group_size = None if group_size is None else int(group_size)
        return _op(x, z, weight, float(eps), group_size, bool(norm_before_gate), None)[0]
    return gated_rms_norm_ref(x, z, weight, eps, group_size, norm_before_gate)
