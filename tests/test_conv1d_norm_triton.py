"""Triton causal conv1d and (gated) RMSNorm against their pure-torch references.

CPU: tiny shapes under TRITON_INTERPRET=1 (set by conftest.py). GPU (`-m gpu`): real shapes.
Errors are relative, ||a - b|| / ||b||, against the reference evaluated in fp32 on the same
(rounded) inputs, with bounds per dtype.
"""
import pytest
import torch

from hybridlab.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from hybridlab.kernels.norm import gated_rms_norm_ref, rms_norm_ref

ct = pytest.importorskip("hybridlab.kernels.conv1d_triton")
nt = pytest.importorskip("hybridlab.kernels.norm_triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def packed_seq_idx(b, l, cuts_per_row, device=DEV):
    """(b, l) int32 sequence ids with boundaries at the given positions of each row."""
    seq = torch.zeros(b, l, dtype=torch.int32, device=device)
    for r, cuts in enumerate(cuts_per_row):
        for c in cuts:
            seq[r, c:] += 1
    return seq


def leaf(t):
    return t.detach().requires_grad_()


def check_grads(got, want, dtype, what):
    tol = TOL[dtype]
    for name, a, b in zip(what, got, want):
        if b is None:
            continue
        assert rel(a, b) < tol, (name, rel(a, b), tol)


# ----------------------------------------------------------------------------- conv1d


@pytest.fixture(params=["rows", "tiles"])
def conv_impl(request):
    """Runs a conv test with the row-streaming kernels (k <= 4) and with the tiled ones."""
    with ct.row_kernels(request.param == "rows"):
        yield request.param


def test_row_kernels_switch_is_scoped_and_only_for_short_filters():
    default = ct._rows(4)
    for enabled in (True, False):
        with ct.row_kernels(enabled):
            assert ct._rows(4) is enabled and ct._rows(5) is False
        assert ct._rows(4) is default


def _conv_case(b, l, d, k, dtype, w_dtype, seq_idx, use_bias, activation="silu", strided=False):
    if strided:  # x sliced out of a wider (b, l, 3d) projection, as Mamba-2's xBC split does
        x = torch.randn(b, l, 3 * d, device=DEV, dtype=dtype)[:, :, d : 2 * d]
    else:
        x = torch.randn(b, l, d, device=DEV, dtype=dtype)
    x = x.requires_grad_() if strided else leaf(x)
    w = leaf(0.5 * torch.randn(d, k, device=DEV, dtype=w_dtype))
    bias = leaf(0.2 * torch.randn(d, device=DEV, dtype=w_dtype)) if use_bias else None
    ins = [x, w] + ([bias] if use_bias else [])

    y = ct.causal_conv1d(x, w, bias, seq_idx=seq_idx, activation=activation)
    assert y.shape == (b, l, d) and y.dtype == dtype
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, ins, dy)

    ref_ins = [leaf(t.float()) for t in ins]
    yr = causal_conv1d_ref(ref_ins[0], ref_ins[1], ref_ins[2] if use_bias else None,
                           seq_idx=seq_idx, activation=activation)
    want = torch.autograd.grad(yr, ref_ins, dy.float())
    assert rel(y, yr) < TOL[dtype], ("y", rel(y, yr))
    check_grads(got, want, dtype, ["dx", "dweight", "dbias"])
    for g, t in zip(got, ins):
        assert g.dtype == t.dtype and g.shape == t.shape


@pytest.mark.parametrize(
    "k,dtype,w_dtype,packed,use_bias",
    [
        (4, torch.float32, torch.float32, True, True),
        (4, torch.float32, torch.float32, False, False),
        (4, torch.bfloat16, torch.bfloat16, True, True),
        (4, torch.bfloat16, torch.float32, False, True),  # autocast-style: bf16 x, fp32 weights
        (3, torch.float16, torch.float16, True, False),
        (2, torch.float32, torch.float32, True, True),
        (5, torch.float32, torch.float32, True, True),  # k > 4 takes the generic backward path
    ],
)
def test_conv1d_matches_reference(k, dtype, w_dtype, packed, use_bias, conv_impl):
    b, l, d = 2, 37, 20  # odd length, d not a multiple of the channel block
    seq = packed_seq_idx(b, l, [[1, 3, 4, 20], [29]]) if packed else None  # incl. 1-token sequences
    _conv_case(b, l, d, k, dtype, w_dtype, seq, use_bias)


def test_conv1d_no_activation_strided_input(conv_impl):
    seq = packed_seq_idx(1, 23, [[7]])
    _conv_case(1, 23, 12, 4, torch.float32, torch.float32, seq, True, activation=None, strided=True)


@pytest.mark.parametrize(
    "k,dtype,packed,use_bias,activation",
    [
        (4, torch.float32, True, False, None),
        (3, torch.float32, False, True, None),
        (2, torch.bfloat16, True, False, "silu"),
        (3, torch.bfloat16, True, True, None),
        (4, torch.bfloat16, False, False, "silu"),
    ],
)
def test_conv1d_grads_more_cases(k, dtype, packed, use_bias, activation, conv_impl):
    """Odd l over several row tiles and chunks; boundaries at, just before and just after tile
    edges (the CPU tiles are 16 rows, chunks 32) and mid-tile; strided (non-contiguous) x."""
    b, l, d = 2, 51, 20
    seq = packed_seq_idx(b, l, [[15, 16, 33, 40], [2, 31, 32, 50]]) if packed else None
    _conv_case(b, l, d, k, dtype, dtype, seq, use_bias, activation=activation, strided=packed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv1d_bwd_fp32_scratch(dtype, monkeypatch):
    """The backward with its dpre scratch kept in fp32 (`_BWD_DPRE_LOWP = False`) agrees too,
    and the 16-bit scratch costs little against it (the tiled backward: the only one with a scratch)."""
    monkeypatch.setattr(ct, "_ROWS", False)
    b, l, d, k = 1, 37, 20, 4
    seq = packed_seq_idx(b, l, [[5, 17]])
    x = torch.randn(b, l, d, device=DEV, dtype=dtype)
    w = 0.5 * torch.randn(d, k, device=DEV, dtype=dtype)
    bias = 0.2 * torch.randn(d, device=DEV, dtype=dtype)
    dy = torch.randn(b, l, d, device=DEV, dtype=dtype)
    grads = {}
    for lowp in (True, False):
        monkeypatch.setattr(ct, "_BWD_DPRE_LOWP", lowp)
        ins = [leaf(x), leaf(w), leaf(bias)]
        y = ct.causal_conv1d(*ins, seq_idx=seq)
        grads[lowp] = torch.autograd.grad(y, ins, dy)
    ref_ins = [leaf(t.float()) for t in (x, w, bias)]
    want = torch.autograd.grad(causal_conv1d_ref(*ref_ins, seq_idx=seq), ref_ins, dy.float())
    for lowp in (True, False):
        check_grads(grads[lowp], want, dtype, ["dx", "dweight", "dbias"])
    # dweight and dbias come from the fp32 dpre either way; dx differs by the scratch rounding
    assert torch.equal(grads[True][1], grads[False][1]) and torch.equal(grads[True][2], grads[False][2])
    assert rel(grads[True][0], grads[False][0]) < TOL[dtype]


def test_conv1d_bwd_broadcast_dy(conv_impl):
    """y.sum() hands the backward an expanded dy (all strides 0)."""
    b, l, d, k = 1, 21, 12, 3
    seq = packed_seq_idx(b, l, [[6]])
    x, w = leaf(torch.randn(b, l, d, device=DEV)), leaf(torch.randn(d, k, device=DEV))
    got = torch.autograd.grad(ct.causal_conv1d(x, w, seq_idx=seq).sum(), [x, w])
    xr, wr = leaf(x), leaf(w)
    want = torch.autograd.grad(causal_conv1d_ref(xr, wr, seq_idx=seq).sum(), [xr, wr])
    check_grads(got, want, torch.float32, ["dx", "dweight"])


def test_conv1d_packed_equals_separate(conv_impl):
    """No tap crosses a boundary: a packed row equals its sequences run one by one."""
    d, k, lens = 12, 4, [5, 1, 11]
    x = torch.randn(1, sum(lens), d, device=DEV)
    w, bias = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    seq = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])[None].to(DEV)
    y = ct.causal_conv1d(x, w, bias, seq_idx=seq)
    parts = torch.split(x, lens, dim=1)
    y_sep = torch.cat([ct.causal_conv1d(p.contiguous(), w, bias) for p in parts], dim=1)
    assert rel(y, y_sep) < 1e-6


@pytest.mark.parametrize("k,dtype,state_dtype", [(4, torch.float32, torch.float32),
                                                 (3, torch.bfloat16, torch.float32)])
def test_conv1d_update_matches_reference(k, dtype, state_dtype):
    b, d = 3, 20
    x = torch.randn(b, d, device=DEV, dtype=dtype)
    state = torch.randn(b, d, k, device=DEV, dtype=state_dtype)
    w, bias = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    state_ref = state.clone()
    y = ct.causal_conv1d_update(x, state, w, bias)
    yr = causal_conv1d_update_ref(x, state_ref, w, bias)
    assert y.dtype == dtype
    assert torch.equal(state, state_ref)
    assert rel(y, yr) < TOL[dtype]


def test_conv1d_update_continues_forward():
    """Decoding token by token reproduces the full-sequence forward."""
    b, l, d, k = 2, 9, 12, 4
    x = torch.randn(b, l, d, device=DEV)
    w, bias = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    y_full = ct.causal_conv1d(x, w, bias)
    state = torch.zeros(b, d, k, device=DEV)
    ys = [ct.causal_conv1d_update(x[:, t], state, w, bias) for t in range(l)]
    assert rel(torch.stack(ys, 1), y_full) < 1e-6


# ----------------------------------------------------------------------------- norms


def _norm_case(shape, dtype, group_size, norm_before_gate, gated=True, w_dtype=torch.float32):
    d = shape[-1]
    x = leaf(torch.randn(*shape, device=DEV, dtype=dtype))
    z = leaf(torch.randn(*shape, device=DEV, dtype=dtype)) if gated else None
    w = leaf(1 + 0.1 * torch.randn(d, device=DEV, dtype=w_dtype))
    ins = [x, z, w] if gated else [x, w]
    if gated:
        y = nt.gated_rms_norm(x, z, w, 1e-5, group_size, norm_before_gate)
    else:
        y = nt.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, ins, dy)
    ref_ins = [leaf(t.float()) for t in ins]
    if gated:
        yr = gated_rms_norm_ref(*ref_ins, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    else:
        yr = rms_norm_ref(*ref_ins, eps=1e-5)
    want = torch.autograd.grad(yr, ref_ins, dy.float())
    assert rel(y, yr) < TOL[dtype], ("y", rel(y, yr))
    check_grads(got, want, dtype, ["dx", "dz", "dweight"] if gated else ["dx", "dweight"])
    for g, t in zip(got, ins):
        assert g.dtype == t.dtype and g.shape == t.shape


@pytest.mark.parametrize(
    "dtype,group_size,norm_before_gate",
    [
        (torch.float32, None, False),
        (torch.float32, None, True),
        (torch.float32, 8, False),
        (torch.bfloat16, 8, True),
        (torch.bfloat16, None, False),
        (torch.float16, 12, False),  # group not a power of two
    ],
)
def test_gated_rms_norm_matches_reference(dtype, group_size, norm_before_gate):
    _norm_case((2, 5, 24), dtype, group_size, norm_before_gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype):
    _norm_case((7, 20), dtype, None, False, gated=False, w_dtype=dtype)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_out_dtype_narrower_than_its_input(out_dtype):
    """An fp32 residual's norm under autocast: fp32 x, output (and so its gradient) narrower;
    dx and dweight stay fp32 and match the fp32 reference at the output's rounding."""
    x = leaf(torch.randn(2, 19, 24, device=DEV))
    w = leaf(1 + 0.1 * torch.randn(24, device=DEV))
    y = nt.rms_norm(x, w, 1e-5, out_dtype)
    assert y.dtype == out_dtype
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w], dy)
    ref_ins = [leaf(t.detach().clone()) for t in (x, w)]
    yr = rms_norm_ref(*ref_ins, eps=1e-5)
    want = torch.autograd.grad(yr, ref_ins, dy.float())
    assert rel(y, yr) < TOL[out_dtype]
    assert all(g.dtype == torch.float32 for g in got)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_conv1d_gpu_real_shape(packed, conv_impl):
    b, l, d = 2, 4099, 1792
    seq = packed_seq_idx(b, l, [[1, 1000, 2500], [4000]]) if packed else None
    _conv_case(b, l, d, 4, torch.bfloat16, torch.bfloat16, seq, True, strided=packed)


@pytest.mark.gpu
def test_conv1d_update_gpu():
    b, d, k = 64, 1792, 4
    x = torch.randn(b, d, device=DEV, dtype=torch.bfloat16)
    state = torch.randn(b, d, k, device=DEV, dtype=torch.bfloat16)
    w, bias = torch.randn(d, k, device=DEV), torch.randn(d, device=DEV)
    state_ref = state.clone()
    y = ct.causal_conv1d_update(x, state, w, bias)
    yr = causal_conv1d_update_ref(x, state_ref, w, bias)
    assert torch.equal(state, state_ref) and rel(y, yr) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("group_size,norm_before_gate", [(None, False), (256, True)])
def test_gated_rms_norm_gpu_real_shape(group_size, norm_before_gate):
    _norm_case((2, 4097, 1536), torch.bfloat16, group_size, norm_before_gate)
