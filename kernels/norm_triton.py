"""Triton RMSNorm and gated RMSNorm, forward and backward, fp32 math.

Definitions are the references in `norm.py`. Per row and per group of G channels,
with u the normalised input and r = rsqrt(mean(u^2) + eps):

    norm_before_gate=False:  u = x * silu(z),  y = u r w
    norm_before_gate=True:   u = x,            y = u r w silu(z)
    plain RMSNorm:           u = x,            y = u r w

Backward, with xhat = u r and g = dL/d(xhat w) (dy, or dy silu(z) when gating after):

    dw    = sum_rows g xhat
    du    = r (g w - xhat mean(g w xhat))          (mean over the group)
    dx    = du silu(z)  or  du
    dz    = du x silu'(z)  or  dy xhat w silu'(z),   silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)

The forward saves only r (one fp32 per row and group); the backward re-reads x, z, dy once and
writes dx, dz once: the memory floor. dw partials go to one slot per backward program and
are summed on the host side (deterministic, no atomics).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import launch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_AUTOTUNE = os.environ.get("HYBRIDLAB_AUTOTUNE", "1") != "0"


def _configs(gpu):
    """One config under the interpreter (autotune with several fails there), a few on the GPU;
    HYBRIDLAB_AUTOTUNE=0 keeps only the first GPU config (fast compiles, e.g. for tests)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 2}, num_warps=1)]
    gpu = gpu if _AUTOTUNE else gpu[:1]
    return [triton.Config({"BLOCK_M": m}, num_warps=w) for m, w in gpu]


# (BLOCK_M, num_warps). ptxas (sm_90a, group 2048 wide) registers per thread: forward
# 124 / 32 / 72 / 77, backward 53 / 111 / 112 / 188. The first is the default when autotuning
# is off (the forward's (2, 4) runs near the copy ceiling: docs/measurements/README.md).
def _fwd_configs():
    return _configs(((2, 4), (1, 8), (2, 8), (4, 16)))


def _bwd_configs():
    return _configs(((1, 16), (1, 8), (2, 16), (1, 4)))


def _prune(configs, named_args, **kwargs):
    # Keep the tile at most 16K fp32 elements per tensor so large groups do not spill.
    bg = kwargs.get("BLOCK_G", named_args.get("BLOCK_G"))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * bg <= 16384]
    return kept or configs[:1]


@triton.autotune(configs=_fwd_configs(), key=["G", "N", "HAS_Z", "NORM_BEFORE_GATE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _norm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr,
    M, N, G, n_groups, sxm, szm, sym, eps,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < M
    offs = tl.arange(0, BLOCK_G)
    gmask = offs < G
    cols = pid_g * G + offs
    mask = rmask[:, None] & gmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sz = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            x = x * sz
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / G + eps)
    tl.store(rstd_ptr + rows * n_groups + pid_g, rstd, mask=rmask)
    w = tl.load(w_ptr + cols, mask=gmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * sz
    tl.store(y_ptr + rows[:, None] * sym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_bwd_configs(), key=["G", "N", "HAS_Z", "NORM_BEFORE_GATE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _norm_bwd_kernel(
    x_ptr, z_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr,
    M, N, G, n_groups, sxm, szm, sdym, sdxm, sdzm,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Program (p, g) handles row blocks p, p + P, p + 2P, ... of group g (P programs along
    rows) and writes its dw partial to dw_ptr[p, group g's columns]."""
    pid_p = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK_G)
    gmask = offs < G
    cols = pid_g * G + offs
    w = tl.load(w_ptr + cols, mask=gmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_G,), dtype=tl.float32)
    n_blocks = tl.cdiv(M, BLOCK_M)
    for blk in range(pid_p, n_blocks, n_prog):
        rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & gmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * sdym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * n_groups + pid_g, mask=rmask, other=0.0)
        u = x
        g = dy
        if HAS_Z:
            z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(z)
            sz = z * s
            dsz = s * (1.0 + z * (1.0 - s))
            if NORM_BEFORE_GATE:
                g = dy * sz
            else:
                u = x * sz
        xhat = u * rstd[:, None]
        dw_acc += tl.sum(g * xhat, axis=0)
        gw = g * w[None, :]
        c1 = tl.sum(gw * xhat, axis=1) / G
        du = (gw - xhat * c1[:, None]) * rstd[:, None]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                dx = du
                dz = dy * xhat * w[None, :] * dsz
            else:
                dx = du * sz
                dz = du * x * dsz
            tl.store(dz_ptr + rows[:, None] * sdzm + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        else:
            dx = du
        tl.store(dx_ptr + rows[:, None] * sdxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid_p * N + cols, dw_acc, mask=gmask)


def _rows(t, d):
    """View (..., d) as (M, d) with unit column stride (copying only if needed)."""
    t2 = t.reshape(-1, d)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _n_bwd_programs(m, device):
    if _INTERPRET:
        return max(1, min(m // 2, 3))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Enough programs to keep ~16 CTAs' loads in flight per SM; the dw partials
    # (programs x d fp32) stay a few % of the traffic.
    return max(1, min(m, 16 * sms))


def _groups(d, group_size):
    group_size = group_size or d
    if d % group_size:
        raise ValueError(f"group_size {group_size} does not divide d {d}")
    return group_size, d // group_size


def forward(x, z, weight, eps, group_size=None, norm_before_gate=False, out_dtype=None):
    """The forward kernel. Returns y (x's shape, contiguous, in out_dtype or else x's dtype) and
    what `backward` needs besides the inputs: rstd (..., n_groups) fp32, one per row and group."""
    shape = x.shape
    d = shape[-1]
    group_size, n_groups = _groups(d, group_size)
    x2 = _rows(x, d)
    z2 = _rows(z, d) if z is not None else None
    m = x2.shape[0]
    y = torch.empty((m, d), device=x.device, dtype=out_dtype or x.dtype)
    rstd = torch.empty((m, n_groups), device=x.device, dtype=torch.float32)
    nbg = bool(norm_before_gate)
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]), n_groups)  # noqa: E731
    launch(_norm_fwd_kernel, grid, (group_size, d, z2 is not None, nbg, x.dtype, y.dtype),
        x2, z2 if z2 is not None else x2, weight, y, rstd,
        m, d, group_size, n_groups, x2.stride(0), z2.stride(0) if z2 is not None else 0, y.stride(0), eps,
        HAS_Z=z2 is not None, NORM_BEFORE_GATE=nbg, BLOCK_G=triton.next_power_of_2(group_size),
    )
    return y.view(shape), rstd.view(*shape[:-1], n_groups)


def backward(dy, x, z, weight, rstd, group_size=None, norm_before_gate=False, out_dz=None):
    """The backward kernel, from the inputs and `forward`'s rstd. Returns dx, dz (None without
    z; written into `out_dz` if given, rows of any stride) and dweight, each in its input's
    dtype."""
    shape = x.shape
    d = shape[-1]
    group_size, n_groups = _groups(d, group_size)
    has_z, nbg = z is not None, bool(norm_before_gate)
    x2, dy2 = _rows(x, d), _rows(dy, d)
    z2 = _rows(z, d) if has_z else x2
    m = x2.shape[0]
    dx = torch.empty((m, d), device=x.device, dtype=x.dtype)
    if has_z:
        dz = torch.empty((m, d), device=x.device, dtype=z.dtype) if out_dz is None else out_dz.view(m, d)
    else:
        dz = dx
    n_prog = _n_bwd_programs(m, x.device)
    dw_part = torch.empty((n_prog, d), device=x.device, dtype=torch.float32)
    launch(_norm_bwd_kernel, (n_prog, n_groups), (group_size, d, has_z, nbg, x.dtype, dy2.dtype),
        x2, z2, weight, dy2, rstd, dx, dz, dw_part,
        m, d, group_size, n_groups,
        x2.stride(0), z2.stride(0) if has_z else 0, dy2.stride(0), dx.stride(0), dz.stride(0) if has_z else 0,
        HAS_Z=has_z, NORM_BEFORE_GATE=nbg, BLOCK_G=triton.next_power_of_2(group_size),
    )
    dw = dw_part.sum(0).to(weight.dtype)
    return dx.view(shape), (dz.view(shape) if out_dz is None else out_dz) if has_z else None, dw


class GatedRMSNormFn(torch.autograd.Function):
    """The kernels on any device (the interpreter's on the CPU). Models reach them through the
    custom op `hybridlab::gated_rms_norm` (norm.py) instead."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, group_size, norm_before_gate, out_dtype=None):
        y, rstd = forward(x, z, weight, eps, group_size, norm_before_gate, out_dtype)
        ctx.save_for_backward(x, z, weight, rstd)
        ctx.group_size, ctx.norm_before_gate = group_size, norm_before_gate
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, weight, rstd = ctx.saved_tensors
        dx, dz, dw = backward(dy, x, z, weight, rstd, ctx.group_size, ctx.norm_before_gate)
        return dx, dz, dw, None, None, None, None


def gated_rms_norm(x, z, weight, eps=1e-5, group_size=None, norm_before_gate=False):
    """x, z (..., d); weight (d,). Same function as `gated_rms_norm_ref`; z=None is a (grouped)
    RMSNorm. Differentiable in x, z and weight."""
    return GatedRMSNormFn.apply(x, z, weight, eps, group_size, norm_before_gate)


def rms_norm(x, weight, eps=1e-5, out_dtype=None):
    """x (..., d); weight (d,). Same function as `rms_norm_ref`."""
    return GatedRMSNormFn.apply(x, None, weight, eps, None, False, out_dtype)
