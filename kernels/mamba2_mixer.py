"""Mamba-2's mixer between its two projections, as one custom op for compiled training.

    zxbcdt (B, L, d_inner + conv_dim + nheads), the in-projection's output
      -> z, xBC, dt                       views
      -> xBC = silu(conv1d(xBC))           conv1d.py
      -> y = SSD(x, dt, A, B, C, D)        ssd.py, x, B, C read out of xBC
      -> gated_rms_norm(y, z)  (B, L, d_inner), for the out-projection

`hybridlab::mamba2_mixer` runs the three kernels (Triton on CUDA, the references elsewhere);
its backward writes dz, d(xBC) and ddt straight into views of one d(zxbcdt) tensor, the
in-projection's gradient. Called as three ops, the block's backward returns three gradients
that torch.compile concatenates into that tensor: a copy of the in-projection's whole output
per layer and step. The training forward only: prefill and decoding (with carried states) call
the three functions themselves (blocks/mamba2.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import conv1d, norm, ssd
from .dispatch import through_op, triton_impl, triton_on_cpu, use_triton


def mixer_split(zxbcdt: Tensor, nheads: int, headdim: int) -> tuple[Tensor, Tensor, Tensor]:
    """zxbcdt (B, L, d_inner + conv_dim + nheads) -> views z (B, L, d_inner), xBC (B, L,
    conv_dim), dt (B, L, nheads). torch.split rather than slicing: in eager autograd its backward
    is one concatenation, where each slice's backward fills a zero tensor of zxbcdt's size and
    the three are summed."""
    d_inner = nheads * headdim
    return torch.split(zxbcdt, [d_inner, zxbcdt.shape[-1] - d_inner - nheads, nheads], dim=-1)


def xbc_split(xBC: Tensor, nheads: int, headdim: int, ngroups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The conv's output xBC (B, L, h*p + 2*g*n) -> views x (B, L, h, p), B and C (B, L, g, n)."""
    d_inner = nheads * headdim
    gn = (xBC.shape[-1] - d_inner) // 2
    x, B, C = torch.split(xBC, [d_inner, gn, gn], dim=-1)
    return x.unflatten(-1, (nheads, headdim)), B.unflatten(-1, (ngroups, -1)), C.unflatten(-1, (ngroups, -1))


def mamba2_mixer_ref(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, nheads, headdim, ngroups,
                     chunk_size, norm_eps, norm_group_size, norm_before_gate, seq_idx=None):
    """The definition: the three references composed. conv_weight (conv_dim, k); A (nheads,)."""
    z, xBC, dt = mixer_split(zxbcdt, nheads, headdim)
    xBC = conv1d.causal_conv1d_ref(xBC, conv_weight, conv_bias, seq_idx=seq_idx)
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    y = ssd.ssd_chunked_ref(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx)
    return norm.gated_rms_norm_ref(y.flatten(2), z, norm_weight, norm_eps, norm_group_size, norm_before_gate)


# The ops ask only for the traced stride order, not Inductor's default of exact strides: the
# kernels read z, xBC and dt with any row stride, and where Inductor stores the in-projection's
# output with other row strides (e.g. padded) the default would copy the (B, L, 3352) tensor
# before the op and again before its backward (seen in one GPU profile, not in the next:
# docs/measurements/, thirteenth session).
_LAYOUT = (torch.Tag.needs_fixed_stride_order,)


@torch.library.custom_op("hybridlab::mamba2_mixer", mutates_args=(), tags=_LAYOUT)
def _op(zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], A: Tensor, D: Optional[Tensor],
        dt_bias: Optional[Tensor], norm_weight: Tensor, nheads: int, headdim: int, ngroups: int, chunk_size: int,
        norm_eps: float, norm_group_size: int, norm_before_gate: bool, seq_idx: Optional[Tensor]
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, xBC after the conv, y, dt_p, cs, prev, rstd): the output and what the backward
    keeps (the three ops' saved tensors; placeholders from the references on the CPU)."""
    z, xBC, dt = mixer_split(zxbcdt, nheads, headdim)
    xBC = conv1d._op(xBC, conv_weight, conv_bias, seq_idx, True)
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    y, _, dt_p, cs, prev, _ = ssd._op(x, dt, A, B, C, chunk_size, D, None, dt_bias, True, None, None, seq_idx)
    out, rstd = norm._op(y.flatten(2), z, norm_weight, norm_eps, norm_group_size, norm_before_gate, None)
    return out, xBC, y, dt_p, cs, prev, rstd


@_op.register_fake
def _op_fake(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, nheads, headdim, ngroups, chunk_size,
             norm_eps, norm_group_size, norm_before_gate, seq_idx):
    z, xBC, dt = mixer_split(zxbcdt, nheads, headdim)
    xBC = xBC.new_empty(xBC.shape)
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    y, _, dt_p, cs, prev, _ = ssd._op_fake(x, dt, A, B, C, chunk_size, D, None, dt_bias, True, None, None, seq_idx)
    out, rstd = norm._op_fake(y.flatten(2), z, norm_weight, norm_eps, norm_group_size, norm_before_gate, None)
    return out, xBC, y, dt_p, cs, prev, rstd


@torch.library.custom_op("hybridlab::mamba2_mixer_backward", mutates_args=(), tags=_LAYOUT)
def _op_backward(dout: Tensor, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], A: Tensor,
                 D: Optional[Tensor], dt_bias: Optional[Tensor], norm_weight: Tensor, xBC: Tensor, y: Tensor,
                 dt_p: Tensor, cs: Tensor, prev: Tensor, rstd: Tensor, nheads: int, headdim: int, ngroups: int,
                 chunk_size: int, norm_eps: float, norm_group_size: int, norm_before_gate: bool,
                 seq_idx: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d zxbcdt, d conv_weight, d conv_bias, dA, dD, ddt_bias, d norm_weight); placeholders
    for absent inputs. Here (the CPU): the three backward ops, their gradients concatenated."""
    if triton_on_cpu():
        return _op_backward_triton(dout, zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, xBC, y, dt_p,
                                   cs, prev, rstd, nheads, headdim, ngroups, chunk_size, norm_eps, norm_group_size,
                                   norm_before_gate, seq_idx)
    z, xBC_in, dt = mixer_split(zxbcdt, nheads, headdim)
    dy, dz, dnorm = norm._op_backward(dout, y.flatten(2), z, norm_weight, rstd, norm_eps, norm_group_size,
                                      norm_before_gate)
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = ssd._op_backward(
        dy.unflatten(-1, (nheads, headdim)), None, x, dt, A, B, C, D, None, dt_bias, None, seq_idx, dt_p, cs, prev,
        x.new_empty(0), chunk_size, True, None)
    dxBC = torch.cat([dx.flatten(2), dB.flatten(2), dC.flatten(2)], dim=-1)
    dxBC_in, dw, db = conv1d._op_backward(dxBC, xBC_in, conv_weight, conv_bias, seq_idx, True)
    return torch.cat([dz, dxBC_in, ddt], dim=-1), dw, db, dA, dD, ddt_bias, dnorm


@_op_backward.register_kernel("cuda")
def _op_backward_triton(dout, zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, xBC, y, dt_p, cs, prev,
                        rstd, nheads, headdim, ngroups, chunk_size, norm_eps, norm_group_size, norm_before_gate,
                        seq_idx):
    z, xBC_in, dt = mixer_split(zxbcdt, nheads, headdim)
    dzxbcdt = torch.empty(zxbcdt.shape, device=zxbcdt.device, dtype=zxbcdt.dtype)
    dz, dxBC_in, ddt = mixer_split(dzxbcdt, nheads, headdim)  # each kernel writes its part here
    dy, _, dnorm = triton_impl("norm_triton").backward(dout, y.flatten(2), z, norm_weight, rstd, norm_group_size,
                                                       norm_before_gate, out_dz=dz)
    dxBC = torch.empty(xBC.shape, device=xBC.device, dtype=xBC.dtype)   # the conv's output gradient
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    dx, dB, dC = xbc_split(dxBC, nheads, headdim, ngroups)
    grads = triton_impl("ssd_triton").backward(
        dy.unflatten(-1, (nheads, headdim)), None, x, dt, A, B, C, D, None, dt_bias, None, seq_idx, dt_p, cs, prev,
        None, chunk_size, True, None, out_dx=dx, out_dB=dB, out_dC=dC, out_ddt=ddt)
    dA, dD, ddt_bias = grads[2], grads[5], grads[7]
    _, dw, db = triton_impl("conv1d_triton").backward(dxBC, xBC_in, conv_weight, conv_bias, seq_idx, True,
                                                      out_dx=dxBC_in)
    empty = zxbcdt.new_empty(0)
    return (dzxbcdt, dw, db if db is not None else empty, dA, dD if dD is not None else empty,
            ddt_bias if ddt_bias is not None else empty, dnorm)


@_op_backward.register_fake
def _op_backward_fake(dout, zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, *rest):
    return tuple(t.new_empty(t.shape) if t is not None else zxbcdt.new_empty(0)
                 for t in (zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight))


def _setup_context(ctx, inputs, output):
    (zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, nheads, headdim, ngroups, chunk_size, norm_eps,
     norm_group_size, norm_before_gate, seq_idx) = inputs
    _, xBC, y, dt_p, cs, prev, rstd = output
    ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, xBC, y, dt_p, cs, prev, rstd,
                          seq_idx)
    ctx.options = nheads, headdim, ngroups, chunk_size, norm_eps, norm_group_size, norm_before_gate
    ctx.absent = [t is None for t in (conv_bias, D, dt_bias)]
    ctx.set_materialize_grads(False)  # the outputs kept for the backward get no gradient: no zeros


def _backward(ctx, dout, *_unused):  # only `out` leaves the block: the rest are for the backward
    if dout is None:
        dout = torch.zeros_like(ctx.saved_tensors[8].flatten(2))  # y's shape
    zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, *saved, seq_idx = ctx.saved_tensors
    dz, dw, db, dA, dD, ddt_bias, dnorm = _op_backward(dout, zxbcdt, conv_weight, conv_bias, A, D, dt_bias,
                                                       norm_weight, *saved, *ctx.options, seq_idx)
    db, dD, ddt_bias = (None if absent else g for g, absent in zip((db, dD, ddt_bias), ctx.absent))
    return dz, dw, db, dA, dD, ddt_bias, dnorm, None, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def mamba2_mixer(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, nheads: int, headdim: int,
                 ngroups: int, chunk_size: int, norm_eps: float, norm_group_size: int, norm_before_gate: bool,
                 seq_idx=None):
    """gated_rms_norm(SSD(silu(conv1d(xBC))), z) from the in-projection's zxbcdt: one op under
    torch.compile on CUDA; elsewhere the three public functions (their kernels or references)."""
    d_state = (conv_weight.shape[0] - nheads * headdim) // (2 * ngroups)   # conv_dim = h*p + 2*g*n
    if use_triton(zxbcdt) and through_op() and ssd.triton_shape(headdim, d_state, zxbcdt.is_cuda):
        seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        return _op(zxbcdt, conv_weight, conv_bias, A, D, dt_bias, norm_weight, int(nheads), int(headdim),
                   int(ngroups), int(chunk_size), float(norm_eps), int(norm_group_size), bool(norm_before_gate),
                   seq_idx)[0]
    z, xBC, dt = mixer_split(zxbcdt, nheads, headdim)
    xBC = conv1d.causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx)
    x, B, C = xbc_split(xBC, nheads, headdim, ngroups)
    y = ssd.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, dt_bias=dt_bias, seq_idx=seq_idx)
    return norm.gated_rms_norm(y.flatten(2), z, norm_weight, norm_eps, norm_group_size, norm_before_gate)
