"""Mamba-2 state-space duality (SSD): chunked scan, naive recurrence, one-token step.

Per head h, with a scalar decay per step (Dao & Gu 2024, Sec. 6):

    dt_t = softplus(dt_raw_t + dt_bias)              (B, L, H)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T  S: (P, N)
    y_t  = S_t C_t + D * x_t

The chunked form splits L into chunks of Q tokens: inside a chunk the output is a masked
(C B^T * decay) matmul; across chunks a short recurrence carries the (P, N) state.
The state is always accumulated in fp32.

`seq_idx` (B, L) marks packed sequences: state never crosses a change of `seq_idx`, also
when the boundary falls inside a chunk. `initial_states` belong to the first sequence.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import through_op, triton_impl, triton_on_cpu, use_triton


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit is not None and dt_limit != (0.0, float("inf")):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _skip_and_gate(y, x, D, z):
    if D is not None:
        D = D.float()
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.float())
    return y


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """cu_seqlens (S+1,) -> seq_idx (1, total_len) int32, for sequences packed in one row."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    if ids.numel() != total_len:
        raise ValueError(f"cu_seqlens covers {ids.numel()} tokens, the input has {total_len}")
    return ids.to(torch.int32)[None]


def ssd_chunked_ref(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None,
                    dt_softplus=True, dt_limit=None, initial_states=None, seq_idx=None,
                    return_final_states=False):
    """Reference chunked SSD scan.

    x (b, l, h, p); dt (b, l, h); A (h,) negative; B, C (b, l, g, n) with h % g == 0;
    D (h,) or (h, p); z (b, l, h, p); dt_bias (h,); initial_states (b, h, p, n);
    seq_idx (b, l) int. Returns y (b, l, h, p) in x's dtype [, final_states (b, h, p, n) fp32].
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    out_dtype = x.dtype
    Q = min(chunk_size, l)  # a sequence shorter than a chunk is one chunk: no padded work
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Bf, Cf = x.float(), B.float(), C.float()

    # Pad to a whole number of chunks. dt = 0 on the padding means decay 1 and no input,
    # so padded steps leave the state untouched.
    pad = (-l) % Q
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        if seq_idx is not None:
            seq_idx = F.pad(seq_idx, (0, pad), value=0)
            seq_idx[:, l:] = seq_idx[:, l - 1 : l]
    nc = (l + pad) // Q
    # Groups -> heads: each group of B/C serves h // g consecutive heads.
    Bh = Bf.repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    Ch = Cf.repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    xc = xf.view(b, nc, Q, h, p)
    dtc = dt.view(b, nc, Q, h)
    dA_cs = torch.cumsum(dtc * A.float(), dim=2)  # (b, nc, Q, h), log-decay from chunk start

    # Intra-chunk (the "diagonal blocks"): y_t = sum_{s<=t} C_t.B_s exp(cs_t - cs_s) dt_s x_s
    seg = dA_cs[:, :, :, None, :] - dA_cs[:, :, None, :, :]  # (b, nc, t, s, h)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    keep = causal[None, None, :, :, None]
    if seq_idx is not None:
        sc = seq_idx.view(b, nc, Q)
        keep = keep & (sc[:, :, :, None] == sc[:, :, None, :])[..., None]
    decay = torch.exp(seg.masked_fill(~keep, float("-inf")))
    CB = torch.einsum("bcthn,bcshn->bctsh", Ch, Bh)
    y = torch.einsum("bctsh,bcshp->bcthp", CB * decay * dtc[:, :, None], xc)

    # Each chunk's own contribution to the state at its last token.
    decay_to_end = torch.exp(dA_cs[:, :, -1:, :] - dA_cs)  # (b, nc, Q, h)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sc == sc[:, :, -1:])[..., None]
    chunk_states = torch.einsum("bcshp,bcshn->bchpn", (decay_to_end * dtc)[..., None] * xc, Bh)

    # Inter-chunk recurrence over nc chunks (short: L / Q steps).
    state = (torch.zeros(b, h, p, n, device=x.device, dtype=torch.float32)
             if initial_states is None else initial_states.float())
    chunk_decay = torch.exp(dA_cs[:, :, -1, :])  # (b, nc, h)
    prev_states = []
    for c in range(nc):
        prev_states.append(state)
        carry = chunk_decay[:, c, :, None, None]
        if seq_idx is not None:
            prev_id = sc[:, c - 1, -1] if c > 0 else sc[:, 0, 0]
            carry = carry * (sc[:, c, -1] == prev_id).float()[:, None, None, None]
        state = carry * state + chunk_states[:, c]
    prev = torch.stack(prev_states, dim=1)  # (b, nc, h, p, n)

    # Off-diagonal: the carried state read out by C with decay from the chunk start.
    state_decay = torch.exp(dA_cs)  # (b, nc, Q, h)
    if seq_idx is not None:
        prev_ids = torch.cat([sc[:, :1, :1], sc[:, :-1, -1:]], dim=1)  # (b, nc, 1)
        state_decay = state_decay * (sc == prev_ids)[..., None]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Ch * state_decay[..., None], prev)

    y = y.reshape(b, nc * Q, h, p)[:, :l]
    y = _skip_and_gate(y, xf[:, :l], D, z).to(out_dtype)
    return (y, state) if return_final_states else y


def ssd_naive(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None,
              initial_states=None, seq_idx=None, return_final_states=False):
    """Token-by-token recurrence: the definition the chunked scan must equal."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    state = (torch.zeros(b, h, p, n, device=x.device, dtype=torch.float32)
             if initial_states is None else initial_states.float().clone())
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
            state = state * same
        dA = torch.exp(dt[:, t] * A.float())  # (b, h)
        state = dA[:, :, None, None] * state + torch.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t], x[:, t].float(), Bh[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    y = _skip_and_gate(y, x.float(), D, z).to(x.dtype)
    return (y, state) if return_final_states else y


def ssd_step_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                 dt_limit=None):
    """One decoding step, updating `state` (b, h, p, n) fp32 in place.

    x (b, h, p); dt (b, h); B, C (b, g, n); z (b, h, p). Returns y (b, h, p) in x's dtype.
    """
    b, h, p = x.shape
    g = B.shape[1]
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)
    Bh = B.float().repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A.float())
    state.mul_(dA[:, :, None, None]).add_(
        dt[:, :, None, None] * x.float()[:, :, :, None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    return _skip_and_gate(y, x.float(), D, z).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The Triton scan as a torch.library custom op: torch.compile sees one opaque node forward and
# one backward (no graph break, no tracing into Triton). On CUDA the op runs the Triton host
# functions; elsewhere the reference (its extra outputs zeros), or the kernels under Triton's
# interpreter when HYBRIDLAB_KERNELS=triton. Inputs that are None have no gradient; the ops'
# outputs must all be Tensors, so absent ones travel as 0-element placeholders.
# ----------------------------------------------------------------------------------------------
def _ssdt():
    return triton_impl("ssd_triton")


def _limit(dt_limit):
    """The op's list back to the reference's tuple (which it compares with (0, inf))."""
    return tuple(dt_limit) if dt_limit is not None else None


def _saved_like(x, B, chunk_size, has_z):
    """Empty tensors shaped as the op's dt_p, cs, prev, ypre (ssd_triton.forward)."""
    b, l, h, p = x.shape
    nc = (l + chunk_size - 1) // chunk_size  # the kernels' chunks are chunk_size tokens, the last padded
    # carried states are stored in the input dtype for bf16/fp16 (ssd_triton._prev_dtype)
    prev_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return (x.new_empty(b, h, nc * chunk_size, dtype=torch.float32),
            x.new_empty(b, h, nc * chunk_size, dtype=torch.float32),
            x.new_empty(b, nc, h, p, B.shape[-1], dtype=prev_dtype),
            x.new_empty(x.shape if has_z else (0,)))


@torch.library.custom_op("hybridlab::ssd_chunked", mutates_args=())
def _op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
        z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_limit: Optional[list[float]],
        initial_states: Optional[Tensor], seq_idx: Optional[Tensor]
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, final_states, dt_p, cs, prev, ypre): the outputs and what the backward keeps
    (ssd_triton.forward; ypre a placeholder without z)."""
    if triton_on_cpu():
        return _op_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                          seq_idx)
    y, final = ssd_chunked_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, _limit(dt_limit),
                               initial_states, seq_idx, return_final_states=True)
    # y can be a strided view of the padded scan; the op's outputs are contiguous, as the fake's
    return (y.contiguous(), final, *(t.zero_() for t in _saved_like(x, B, chunk_size, z is not None)))


@_op.register_kernel("cuda")
def _op_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx):
    y, final, dt_p, cs, prev, ypre = _ssdt().forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                                     dt_limit, initial_states, seq_idx)
    return y, final, dt_p, cs, prev, (ypre if ypre is not None else x.new_empty(0))


@_op.register_fake
def _op_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx):
    b, _, h, p = x.shape
    final = x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)
    return (x.new_empty(x.shape), final, *_saved_like(x, B, chunk_size, z is not None))


_GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@torch.library.custom_op("hybridlab::ssd_chunked_backward", mutates_args=())
def _op_backward(dy: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                 C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                 initial_states: Optional[Tensor], seq_idx: Optional[Tensor], dt_p: Tensor, cs: Tensor,
                 prev: Tensor, ypre: Tensor, chunk_size: int, dt_softplus: bool,
                 dt_limit: Optional[list[float]]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                           Tensor, Tensor, Tensor]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states), each in its input's dtype and
    shape; a placeholder for an input that is None. dfinal None: no gradient of final_states."""
    if triton_on_cpu():
        return _op_backward_triton(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p,
                                   cs, prev, ypre, chunk_size, dt_softplus, dt_limit)
    # the reference's gradients; an op's implementation runs below autograd, torch.func does not
    inputs = dict(zip(_GRAD_INPUTS, (x, dt, A, B, C, D, z, dt_bias, initial_states)))
    names = [k for k, v in inputs.items() if v is not None]

    def ref(*tensors):
        kw = {**inputs, **dict(zip(names, tensors))}
        return ssd_chunked_ref(chunk_size=chunk_size, dt_softplus=dt_softplus, dt_limit=_limit(dt_limit),
                               seq_idx=seq_idx, return_final_states=True, **kw)

    (_, final), vjp = torch.func.vjp(ref, *(inputs[k] for k in names))
    grads = dict(zip(names, vjp((dy, dfinal if dfinal is not None else torch.zeros_like(final)))))
    return tuple(grads[k].contiguous() if k in grads else x.new_empty(0) for k in _GRAD_INPUTS)


@_op_backward.register_kernel("cuda")
def _op_backward_triton(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p, cs, prev,
                        ypre, chunk_size, dt_softplus, dt_limit):
    grads = _ssdt().backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p, cs,
                             prev, ypre, chunk_size, dt_softplus, dt_limit)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_op_backward.register_fake
def _op_backward_fake(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p, cs, prev,
                      ypre, chunk_size, dt_softplus, dt_limit):
    return tuple(t.new_empty(t.shape) if t is not None else x.new_empty(0)
                 for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx = inputs
    _, _, dt_p, cs, prev, ypre = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_p, cs, prev, ypre)
    ctx.options = chunk_size, dt_softplus, dt_limit
    ctx.absent = [t is None for t in (D, z, dt_bias, initial_states)]
    # an unused final_states then gives dfinal None, not zeros: the kernels skip its gradient
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dfinal, _ddt_p, _dcs, _dprev, _dypre):
    x, *saved = ctx.saved_tensors
    if dy is None:  # only final_states was used
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, *optional = _op_backward(dy, dfinal, x, *saved, *ctx.options)
    dD, dz, ddt_bias, dinit = (None if absent else g for g, absent in zip(optional, ctx.absent))
    return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, None, None, dinit, None


_op.register_autograd(_backward, setup_context=_setup_context)


def triton_shape(headdim: int, d_state: int, on_gpu: bool = True) -> bool:
    """Whether the Triton scan runs for this head and state size. Below 16 both ways (toy models:
    P = N = 8) its backward hit an illegal memory access on the H100 in bf16 (fp32 ran, as did
    P = 8 with N = 16 and P = 16 with N = 8; session 13, docs/measurements/), a fault the
    interpreter does not show (so it keeps them); until it is found, the GPU runs the reference."""
    return not on_gpu or headdim >= 16 or d_state >= 16


def ssd_chunked(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=True,
                dt_limit=None, initial_states=None, seq_idx=None, return_final_states=False):
    """Dispatching entry point: the Triton scan (through the op) on CUDA when available, the
    reference otherwise (eager CPU training keeps plain autograd through it)."""
    if use_triton(x) and triton_shape(x.shape[-1], B.shape[-1], x.is_cuda):
        if not through_op():  # eager: the autograd.Function (less host time than the op)
            return _ssdt().ssd_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
                                       initial_states, seq_idx, return_final_states)
        # under torch.compile: the op, one node; nothing below that compile cannot trace. x, dt,
        # B and C go in as they are (the kernels take their strides: in Mamba-2, views of the
        # conv's output and the in-projection); z contiguous here, outside the op, so the op's
        # saved z is the copy the kernels read and the backward does not copy it again
        z = z.contiguous() if z is not None else None
        seq_idx = seq_idx.to(torch.int32) if seq_idx is not None else None  # the kernels' dtype
        dt_limit = None if dt_limit is None else [float(dt_limit[0]), float(dt_limit[1])]
        y, final = _op(x, dt, A, B, C, int(chunk_size), D, z, dt_bias, bool(dt_softplus), dt_limit,
                       initial_states, seq_idx)[:2]
        return (y, final) if return_final_states else y
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                           dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
                           seq_idx=seq_idx, return_final_states=return_final_states)


def ssd_step(state, x, dt, A, B, C, **kwargs):
    impl = triton_impl("ssd_triton") if use_triton(x) else None
    if impl is not None:
        return impl.ssd_step(state, x, dt, A, B, C, **kwargs)
    return ssd_step_ref(state, x, dt, A, B, C, **kwargs)
