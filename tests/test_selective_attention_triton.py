"""Triton selective attention vs the pure-torch reference: forward, gradients, decode.

On the CPU the kernels run under TRITON_INTERPRET=1 (conftest) with 16x16 tiles, so tiny
shapes already cover several query tiles, every key-loop segment and the tail masks. The
`gpu` tests repeat the comparison at real shapes (autotuned tiles) on CUDA.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hybridlab.kernels import selective_attention_triton as sat  # noqa: E402
from hybridlab.kernels.selective_attention import (  # noqa: E402
    selective_attention_decode_ref,
    selective_attention_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# relative-error bounds, ||a - b|| / ||b||, against an fp32 reference on the same inputs. The
# interpreter's dots are exact fp32; the GPU's fp32 dots are tf32.
TOL = {
    torch.float32: 5e-3 if CUDA else 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Output buffers start as NaN instead of whatever the allocator hands out (often zeros on
    the CPU), so a row the kernels forget to write (e.g. an unselected query's zero row of o
    or dq) fails the comparisons below."""
    monkeypatch.setattr(sat, "_empty_like", lambda t: torch.full_like(t, float("nan")))


def _check(name, got, want, tol):
    got, want = got.float(), want.float()
    ref_norm = want.norm().item()
    if ref_norm == 0.0:
        assert got.abs().max().item() == 0.0, f"{name}: expected exact zeros"
        return
    err = (got - want).norm().item() / ref_norm
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"


def _selection(b, L, capacity, device, generator=None):
    """A random q_mask with round(capacity * L) selected positions per sequence."""
    n = int(round(capacity * L))
    scores = torch.rand(b, L, device=device, generator=generator)
    mask = torch.zeros(b, L, dtype=torch.bool, device=device)
    if n:
        mask.scatter_(1, scores.topk(n, dim=1).indices, True)
    return mask


def _run_case(b, L, hq, hkv, d, dtype, window, capacity, kv_mode, device, grads=True,
              fused_qkv=False, q_mask=None):
    """capacity None: no masks (dense), unless q_mask is given. kv_mode: 'selected'
    (kv_mask = q_mask), 'random', None."""
    if fused_qkv:  # q/k/v as strided views of one projection output, like a fused in-proj
        qkv = torch.randn(b, L, hq + 2 * hkv, d, device=device, dtype=dtype)
        q, k, v = qkv.split([hq, hkv, hkv], dim=2)
        q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    else:
        q = torch.randn(b, L, hq, d, device=device, dtype=dtype, requires_grad=grads)
        k = torch.randn(b, L, hkv, d, device=device, dtype=dtype, requires_grad=grads)
        v = torch.randn(b, L, hkv, d, device=device, dtype=dtype, requires_grad=grads)
    if q_mask is None and capacity is not None:
        q_mask = _selection(b, L, capacity, device)
    if kv_mode == "selected":
        kv_mask = q_mask
    elif kv_mode == "random":
        kv_mask = torch.rand(b, L, device=device) < 0.5
    else:
        kv_mask = None

    o = sat.selective_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=window)
    assert o.shape == q.shape and o.dtype == dtype
    # the reference in fp32 from the same (rounded) inputs is the ground truth
    q32, k32, v32 = (t.detach().float().requires_grad_(grads) for t in (q, k, v))
    o_ref = selective_attention_ref(q32, k32, v32, q_mask, kv_mask, window)
    tol = TOL[dtype]
    _check("out", o, o_ref, tol)
    assert not o.isnan().any(), "every output row must be written"
    if q_mask is not None:
        assert (o[~q_mask] == 0).all(), "unselected queries must output zeros"
    if not grads:
        return
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    _check("dq", dq, dq_ref, tol)
    _check("dk", dk, dk_ref, tol)
    _check("dv", dv, dv_ref, tol)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not g.isnan().any(), f"every {name} row must be written"
    if q_mask is not None:
        assert (dq[~q_mask] == 0).all(), "unselected queries must get zero dq"


def _mixed_selection(b, L, device):
    """Row 0 selects nothing, row 1 everything, the others a mix of edge patterns (every row
    but the last, only the last, only the first, random), so the zeroing of unselected rows
    meets empty rows, full rows, long gaps and short tails in one batch."""
    mask = torch.rand(b, L, device=device) < 0.3
    mask[0] = False
    mask[1] = True
    patterns = [lambda m: m.fill_(True).__setitem__(-1, False),  # all but the last
                lambda m: m.fill_(False).__setitem__(-1, True),  # only the last
                lambda m: m.fill_(False).__setitem__(0, True)]  # only the first
    for i in range(2, min(b, 2 + len(patterns))):
        patterns[i - 2](mask[i])
    return mask


# (b, L, hq, hkv, dtype, window, capacity, kv_mode): tiny, under the interpreter on the CPU
CPU_CASES = [
    pytest.param(1, 64, 2, 2, torch.float32, None, None, None, id="dense-causal"),
    pytest.param(1, 61, 2, 1, torch.float32, 24, None, None, id="dense-window-odd-gqa"),
    pytest.param(1, 40, 2, 2, torch.float16, 7, None, None, id="dense-window<block-fp16"),
    pytest.param(1, 45, 2, 2, torch.float32, None, None, "random", id="dense-kvmask"),
    pytest.param(2, 77, 2, 2, torch.float32, 16, 0.3, None, id="sel-0.3-window16-odd"),
    pytest.param(1, 50, 2, 1, torch.float32, None, 0.5, None, id="sel-0.5-causal-gqa"),
    pytest.param(1, 37, 2, 2, torch.float32, 200, 1.0, None, id="sel-all-window>L"),
    pytest.param(1, 33, 2, 2, torch.float32, 8, 0.0, None, id="sel-none"),
    pytest.param(2, 59, 2, 2, torch.float32, 20, 0.4, "selected", id="sel-kv=q-window20"),
    pytest.param(1, 48, 2, 2, torch.float32, 3, 0.5, "selected", id="sel-window3"),
    pytest.param(1, 64, 2, 2, torch.bfloat16, 32, 0.5, None, id="sel-bf16"),
    pytest.param(1, 53, 2, 1, torch.float16, None, 0.2, "random", id="sel-fp16-kvrandom-gqa"),
]


@pytest.mark.parametrize("b, L, hq, hkv, dtype, window, capacity, kv_mode", CPU_CASES)
def test_selective_attention_matches_reference(b, L, hq, hkv, dtype, window, capacity, kv_mode):
    _run_case(b, L, hq, hkv, 16, dtype, window, capacity, kv_mode, DEVICE)


# (b, L, hq, hkv, dtype, window, kv_mode): zero / all / edge selections in one batch
MIXED_CASES = [
    pytest.param(5, 45, 2, 1, torch.float32, 20, None, id="odd-gqa-window"),
    pytest.param(3, 37, 2, 2, torch.float32, None, "selected", id="odd-kv=q-causal"),
    pytest.param(2, 32, 2, 1, torch.float16, 9, "random", id="fp16-kvrandom-gqa"),
]


@pytest.mark.parametrize("b, L, hq, hkv, dtype, window, kv_mode", MIXED_CASES)
def test_mixed_selections_zero_rows_and_grads(b, L, hq, hkv, dtype, window, kv_mode):
    """Unselected rows of o and dq come out exactly zero (from NaN-filled buffers: the kernels
    write them, nothing is pre-zeroed) and the rest matches the reference, with a batch row
    that selects nothing and one that selects everything."""
    q_mask = _mixed_selection(b, L, DEVICE)
    _run_case(b, L, hq, hkv, 16, dtype, window, None, kv_mode, DEVICE, q_mask=q_mask)


def _compact_ref(mask):
    b, L = mask.shape
    rank = torch.zeros(b, L + 1, dtype=torch.int32, device=mask.device)
    rank[:, 1:] = mask.int().cumsum(1)
    return rank


@pytest.mark.parametrize("one_pass, L", [
    (True, 1), (True, 16), (True, 17), (True, 70),  # 70: several blocks and prefix steps
    (False, 1), (False, 17), (False, 70), (False, 290),  # 290: 19 block counts, 2 steps
])
def test_compact_matches_cumsum(monkeypatch, one_pass, L):
    """rank = exclusive prefix count (rank[:, L] = count); sel_pos[:count] = the selected
    positions in order; both the one-pass and the two-pass (per-block counts) compaction.
    (Interpreter blocks are 16 positions and prefix steps 16 entries.)"""
    monkeypatch.setattr(sat, "_COMPACT_ONE_PASS_MAX_L", 1 << 30 if one_pass else 0)
    mask = _mixed_selection(5, L, DEVICE)
    sel_pos, rank = sat._compact(mask, L)
    assert sel_pos.shape == rank.shape == (5, L + 1)
    assert sel_pos.dtype == rank.dtype == torch.int32
    assert torch.equal(rank, _compact_ref(mask))
    for i in range(5):
        count = int(rank[i, L])
        assert torch.equal(sel_pos[i, :count].long(), mask[i].nonzero().flatten())


def test_two_pass_compaction_end_to_end(monkeypatch):
    monkeypatch.setattr(sat, "_COMPACT_ONE_PASS_MAX_L", 0)
    q_mask = _mixed_selection(3, 41, DEVICE)
    _run_case(3, 41, 2, 1, 16, torch.float32, 13, None, "selected", DEVICE, q_mask=q_mask)


def test_strided_views_of_fused_projection():
    _run_case(1, 40, 2, 1, 16, torch.float32, 12, 0.5, None, DEVICE, fused_qkv=True)


def test_int64_offsets_path(monkeypatch):
    """The OFF64 variant (row offsets past 2**31 elements) is only taken for huge tensors:
    force it on a tiny one."""
    monkeypatch.setattr(sat, "_needs_int64", lambda *a: True)
    _run_case(1, 40, 2, 1, 16, torch.float32, 12, 0.5, "selected", DEVICE)


def test_window_one_is_identity_on_v():
    """window 1: each selected query sees only itself, so its output is its own v row."""
    q, k, v = (torch.randn(1, 35, 2, 16, device=DEVICE) for _ in range(3))
    q_mask = _selection(1, 35, 0.5, DEVICE)
    o = sat.selective_attention(q, k, v, q_mask=q_mask, window=1)
    _check("out", o, v * q_mask[:, :, None, None], TOL[torch.float32])


def test_empty_sequence():
    q = torch.randn(1, 0, 2, 16, device=DEVICE, requires_grad=True)
    o = sat.selective_attention(q, q, q, q_mask=torch.zeros(1, 0, dtype=torch.bool, device=DEVICE))
    assert o.shape == (1, 0, 2, 16)


def _decode_case(b, S, hq, hkv, d, dtype, window, device, empty_row=False):
    """A ring buffer of S slots holding positions up to pos; some slots empty (-1), some in
    the future of a shorter sequence, some outside the window."""
    q = torch.randn(b, hq, d, device=device, dtype=dtype)
    k_cache = torch.randn(b, S, hkv, d, device=device, dtype=dtype)
    v_cache = torch.randn(b, S, hkv, d, device=device, dtype=dtype)
    pos = torch.randint(S // 2, 3 * S, (b,), device=device)
    # slot s holds the latest position p <= pos with p % S == s (ring buffer)
    s = torch.arange(S, device=device)
    slot_pos = pos[:, None] - ((pos[:, None] - s[None, :]) % S)
    slot_pos = torch.where(torch.rand(b, S, device=device) < 0.2, -1, slot_pos)  # empty slots
    if empty_row:
        slot_pos[0] = -1
    out = sat.selective_attention_decode(q, k_cache, v_cache, slot_pos, pos, window, None)
    ref = selective_attention_decode_ref(q.float(), k_cache.float(), v_cache.float(),
                                         slot_pos, pos, window)
    assert out.shape == q.shape and out.dtype == dtype
    _check("decode", out, ref, TOL[dtype])
    if empty_row:
        assert (out[0] == 0).all()


@pytest.mark.parametrize("window", [None, 5, 1000])
def test_decode_matches_reference(window):
    _decode_case(3, 37, 4, 2, 16, torch.float32, window, DEVICE)


def test_decode_empty_cache_gives_zeros():
    _decode_case(2, 20, 2, 2, 16, torch.float32, 8, DEVICE, empty_row=True)


@pytest.mark.parametrize("d", [8, 24])
def test_head_dims_the_kernels_cannot_tile_run_the_reference(monkeypatch, d):
    """A head dim the Triton tiles cannot take (not a power of two >= 16) runs the reference,
    forward, backward and decode, where the kernels would raise: a model that trains on the
    CPU trains on CUDA too."""
    from hybridlab.kernels.selective_attention import selective_attention, selective_attention_decode

    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")  # the Triton path, as on CUDA
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, d, generator=g, device=DEVICE, requires_grad=True) for _ in range(3))
    q_mask = _selection(1, 20, 0.3, DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        sat.selective_attention(q, k, v, q_mask, None, 8, None, None)  # what the kernels say
    o = selective_attention(q, k, v, q_mask=q_mask, window=8)
    o.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = selective_attention_ref(q, k, v, q_mask, None, 8)
    want.sum().backward()
    torch.testing.assert_close(o, want)
    for got, ref in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, ref)
    slot_pos = torch.arange(20, device=DEVICE)[None].expand(1, 20)
    pos = torch.full((1,), 19, device=DEVICE)
    torch.testing.assert_close(
        selective_attention_decode(q[:, 0].detach(), k.detach(), v.detach(), slot_pos, pos, 8),
        selective_attention_decode_ref(q[:, 0].detach(), k.detach(), v.detach(), slot_pos, pos, 8))


# ------------------------------------------------------------------------------------------
# real shapes, CUDA only (the GPU run is also the race test: the interpreter is sequential)
# ------------------------------------------------------------------------------------------
GPU_CASES = [
    pytest.param(2, 2048, 4, 2, torch.bfloat16, 256, 0.15, None, id="bf16-sel0.15-w256-gqa"),
    pytest.param(2, 2047, 4, 4, torch.bfloat16, 512, 0.3, "selected", id="bf16-kv=q-odd"),
    pytest.param(2, 1024, 4, 4, torch.bfloat16, 4096, 0.0, None, id="bf16-none"),
    pytest.param(2, 2048, 4, 4, torch.bfloat16, 300, 1.0, None, id="bf16-all-masked"),
    pytest.param(1, 3001, 4, 1, torch.bfloat16, None, None, None, id="bf16-dense-causal-gqa-odd"),
    pytest.param(2, 4096, 12, 12, torch.bfloat16, 2048, None, None, id="bf16-dense-window"),
    pytest.param(1, 1024, 4, 2, torch.float16, None, 0.5, "random", id="fp16-kvrandom"),
    pytest.param(1, 1024, 4, 4, torch.float32, 200, 0.15, None, id="fp32-sel"),
    pytest.param(2, 4096, 12, 12, torch.bfloat16, 2048, 0.15, None, id="bf16-taipan-shape"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b, L, hq, hkv, dtype, window, capacity, kv_mode", GPU_CASES)
def test_selective_attention_gpu(b, L, hq, hkv, dtype, window, capacity, kv_mode):
    _run_case(b, L, hq, hkv, 64, dtype, window, capacity, kv_mode, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, window", [(torch.bfloat16, 1024), (torch.float32, None)])
def test_decode_gpu(dtype, window):
    _decode_case(4, 2048, 12, 4, 64, dtype, window, "cuda")
