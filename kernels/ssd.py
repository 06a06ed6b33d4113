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

import torch
import torch.nn.functional as F

from .dispatch import triton_impl, use_triton


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


def ssd_chunked(x, dt, A, B, C, chunk_size=256, **kwargs):
    """Dispatching entry point: Triton on CUDA when available, the reference otherwise."""
    impl = triton_impl("ssd_triton") if use_triton(x) else None
    if impl is not None:
        return impl.ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)
    return ssd_chunked_ref(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)


def ssd_step(state, x, dt, A, B, C, **kwargs):
    impl = triton_impl("ssd_triton") if use_triton(x) else None
    if impl is not None:
        return impl.ssd_step(state, x, dt, A, B, C, **kwargs)
    return ssd_step_ref(state, x, dt, A, B, C, **kwargs)
