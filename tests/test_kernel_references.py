"""The pure-torch references are the definitions Triton kernels are tested against:
check them against even simpler ones (token loops, per-sequence runs, dense masks)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlab.kernels import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    gated_rms_norm_ref,
    selective_attention_decode_ref,
    selective_attention_ref,
    seq_idx_from_cu_seqlens,
    ssd_chunked_ref,
    ssd_naive,
    ssd_step_ref,
)
from tests.helpers import rel_err


def ssd_inputs(b=2, l=37, h=4, p=8, g=2, n=16, dtype=torch.float32):
    return dict(
        x=torch.randn(b, l, h, p, dtype=dtype), dt=torch.randn(b, l, h, dtype=dtype),
        A=-torch.rand(h) * 4 - 0.1, B=torch.randn(b, l, g, n, dtype=dtype),
        C=torch.randn(b, l, g, n, dtype=dtype),
    )


@pytest.mark.parametrize("l,chunk", [(37, 8), (64, 16), (5, 16), (50, 64)])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_chunked_scan_equals_recurrence(l, chunk, with_init, g):
    inp = ssd_inputs(l=l, g=g)
    kw = dict(D=torch.randn(4), dt_bias=torch.randn(4), z=torch.randn(2, l, 4, 8))
    init = torch.randn(2, 4, 8, 16) if with_init else None
    y, final = ssd_chunked_ref(**inp, chunk_size=chunk, initial_states=init, return_final_states=True, **kw)
    y0, final0 = ssd_naive(**inp, initial_states=init, return_final_states=True, **kw)
    assert rel_err(y, y0) < 1e-5 and rel_err(final, final0) < 1e-5


def test_packed_sequences_do_not_leak_mid_chunk():
    l, chunk = 45, 16
    cu = torch.tensor([0, 7, 20, 21, 45])  # boundaries inside chunks, and a 1-token sequence
    seq_idx = seq_idx_from_cu_seqlens(cu, l)
    inp = ssd_inputs(b=1, l=l)
    init = torch.randn(1, 4, 8, 16)
    y, final = ssd_chunked_ref(**inp, chunk_size=chunk, seq_idx=seq_idx, initial_states=init,
                               D=torch.randn(4, 8), return_final_states=True)
    y0, _ = ssd_naive(**inp, seq_idx=seq_idx, initial_states=init, D=None, return_final_states=True)
    # and each sequence run on its own (only the first sees the initial state)
    for i in range(4):
        s, e = cu[i].item(), cu[i + 1].item()
        part = {k: (v[:, s:e] if v.dim() > 1 else v) for k, v in inp.items()}
        yi, fi = ssd_naive(**part, initial_states=init if i == 0 else None, return_final_states=True)
        yc = ssd_chunked_ref(**inp, chunk_size=chunk, seq_idx=seq_idx, initial_states=init)[:, s:e]
        assert rel_err(yc, yi) < 1e-5
    assert rel_err(final, fi) < 1e-5
    assert rel_err(ssd_chunked_ref(**inp, chunk_size=chunk, seq_idx=seq_idx, initial_states=init), y0) < 1e-5


def test_step_equals_recurrence():
    inp = ssd_inputs(l=13)
    init = torch.randn(2, 4, 8, 16)
    D, bias = torch.randn(4), torch.randn(4)
    z = torch.randn(2, 13, 4, 8)
    state = init.clone()
    ys = [ssd_step_ref(state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
                       D=D, z=z[:, t], dt_bias=bias) for t in range(13)]
    y0, f0 = ssd_naive(**inp, D=D, z=z, dt_bias=bias, initial_states=init, return_final_states=True)
    assert rel_err(torch.stack(ys, 1), y0) < 1e-5 and rel_err(state, f0) < 1e-5


def test_scan_keeps_input_dtype_and_fp32_state():
    inp = ssd_inputs(l=20, dtype=torch.bfloat16)
    y, final = ssd_chunked_ref(**inp, chunk_size=8, return_final_states=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32


def test_conv1d_packed_equals_per_sequence_and_update():
    x, w, bias = torch.randn(1, 30, 6), torch.randn(6, 4), torch.randn(6)
    cu = torch.tensor([0, 2, 17, 30])
    y = causal_conv1d_ref(x, w, bias, seq_idx=seq_idx_from_cu_seqlens(cu, 30))
    for i in range(3):
        s, e = cu[i].item(), cu[i + 1].item()
        torch.testing.assert_close(y[:, s:e], causal_conv1d_ref(x[:, s:e], w, bias))
    state = torch.zeros(1, 6, 4)
    ys = torch.stack([causal_conv1d_update_ref(x[:, t], state, w, bias) for t in range(30)], 1)
    torch.testing.assert_close(ys, causal_conv1d_ref(x, w, bias))


def test_gated_rms_norm_modes():
    x, z, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16) + 0.5
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)  # noqa: E731
    torch.testing.assert_close(gated_rms_norm_ref(x, z, w), rms(x * F.silu(z)) * w)
    torch.testing.assert_close(gated_rms_norm_ref(x, z, w, norm_before_gate=True), rms(x) * w * F.silu(z))
    grouped = gated_rms_norm_ref(x, z, w, group_size=8)
    g = (x * F.silu(z)).view(3, 2, 8)
    torch.testing.assert_close(grouped, rms(g).view(3, 16) * w)


def attention_loop(q, k, v, q_mask, kv_mask, window):
    """Query by query, key by key: the definition in selective_attention.py's docstring."""
    b, L, hq, d = q.shape
    rep = hq // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for i in range(L):
            if q_mask is not None and not q_mask[bi, i]:
                continue
            keys = [j for j in range(i + 1) if (window is None or i - j < window)
                    and (kv_mask is None or kv_mask[bi, j] or j == i)]
            for h in range(hq):
                kk, vv = k[bi, keys, h // rep], v[bi, keys, h // rep]
                p = torch.softmax(kk @ q[bi, i, h] / math.sqrt(d), dim=0)
                out[bi, i, h] = p @ vv
    return out


@pytest.mark.parametrize("window", [None, 1, 4, 100])
@pytest.mark.parametrize("mode", ["dense", "selected", "selected_kv", "none", "all"])
def test_selective_attention_reference(window, mode):
    b, L, hq, hkv, d = 2, 13, 4, 2, 8
    q, k, v = torch.randn(b, L, hq, d), torch.randn(b, L, hkv, d), torch.randn(b, L, hkv, d)
    sel = torch.rand(b, L) < 0.4
    q_mask, kv_mask = {
        "dense": (None, None), "selected": (sel, None), "selected_kv": (sel, sel),
        "none": (torch.zeros(b, L, dtype=torch.bool), None), "all": (torch.ones(b, L, dtype=torch.bool), None),
    }[mode]
    out = selective_attention_ref(q, k, v, q_mask, kv_mask, window)
    torch.testing.assert_close(out, attention_loop(q, k, v, q_mask, kv_mask, window), atol=1e-5, rtol=1e-5)


def test_decode_reference_matches_full():
    b, L, h, d, window = 2, 11, 2, 8, 4
    q, k, v = torch.randn(b, L, h, d), torch.randn(b, L, h, d), torch.randn(b, L, h, d)
    full = selective_attention_ref(q, k, v, window=window)
    slots = window
    kc, vc = torch.zeros(b, slots, h, d), torch.zeros(b, slots, h, d)
    slot_pos = torch.full((b, slots), -1)
    for t in range(L):
        kc[:, t % slots], vc[:, t % slots], slot_pos[:, t % slots] = k[:, t], v[:, t], t
        o = selective_attention_decode_ref(q[:, t], kc, vc, slot_pos, torch.full((b,), t), window)
        torch.testing.assert_close(o, full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_equals_reference(dtype):
    from hybridlab.kernels import linear_cross_entropy, linear_cross_entropy_ref

    n, d, V = 37, 16, 50
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = torch.randn(V, d, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (n,))
    t[::5] = -100  # ignored positions
    loss = linear_cross_entropy(h, w, t, chunk=8)
    ref = linear_cross_entropy_ref(h, w, t)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref.item()) < tol * abs(ref.item())
    assert rel_err(gh, rh) < tol and rel_err(gw, rw) < tol
