"""Document packing: several documents in one row, `seq_idx` numbering them, must give every
document the logits and gradients it gets alone.

Model level on the CPU references (every block type: Mamba-2's conv and SSD scan, SAL, full
attention, sliding window, SwiGLU), and the Triton `selective_attention` with `seq_idx`
against the reference under TRITON_INTERPRET=1 (conftest) at tiny shapes. The `gpu` tests
repeat both at real shapes with the Triton kernels on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from hybridlab.blocks.sal import SALBlock, documents, sequence_shares
from hybridlab.graph import parse_arch
from hybridlab.kernels.selective_attention import selective_attention_ref
from hybridlab.model import HybridLM
from tests.helpers import TINY, open_sal_gate

CUDA = torch.cuda.is_available()
VOCAB = 50


def seq_idx_of(*lengths: int) -> torch.Tensor:
    """Document lengths -> seq_idx (L,) int32: 0 for the first document's tokens, 1, ..."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).int()


def every_block_model(triton_shapes=False, **sal) -> HybridLM:
    """mamba2 (chunk 8: document starts fall inside and on chunks), sal, attention (RoPE),
    swa (window 5), mlp, twice over, with the SAL's gate opened to select about half.
    `triton_shapes`: the smallest head and chunk sizes the Triton kernels take (16)."""
    defaults = {name: dict(cfg) for name, cfg in TINY.items()}
    if triton_shapes:
        defaults["mamba2"].update(d_state=16, headdim=16, chunk_size=16)
        for name in ("sal", "attention", "swa"):
            defaults[name]["head_dim"] = 16
    defaults["sal"].update(sal)
    arch = parse_arch({"name": "packed", "d_model": 32, "vocab_size": VOCAB,
                       "defaults": defaults, "pattern": "(M S A W F)*2"})
    model = HybridLM(arch)
    for layer in model.layers:
        if isinstance(layer, SALBlock):
            open_sal_gate(layer, scale=1.0)
    return model


SAL_VARIANTS = [
    pytest.param({}, id="sal-calibrated-kv=all-nope"),
    pytest.param({"inference": "topk", "kv": "selected", "positional": "rope"}, id="sal-topk-kv=sel-rope"),
    pytest.param({"inference": "threshold", "window": None}, id="sal-threshold-unbounded"),
]


def packed_vs_alone(model, rows: list[list[int]], device="cpu"):
    """Rows of document lengths (each row the same total) -> (packed logits (B, L, V), the
    documents' logits run one by one, cat back into (B, L, V))."""
    L = sum(rows[0])
    idx = torch.randint(0, VOCAB, (len(rows), L), device=device)
    seq_idx = torch.stack([seq_idx_of(*lengths) for lengths in rows]).to(device)
    with torch.no_grad():
        packed = model(idx, seq_idx=seq_idx).logits
        alone = []
        for r, lengths in enumerate(rows):
            bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
            alone.append(torch.cat([model(idx[r:r + 1, s:e]).logits
                                    for s, e in zip(bounds[:-1], bounds[1:])], dim=1))
        unpacked = model(idx).logits  # the same rows without seq_idx: documents see each other
    return packed, torch.cat(alone), unpacked


@pytest.mark.parametrize("sal", SAL_VARIANTS)
def test_packed_logits_equal_each_document_alone(sal):
    model = every_block_model(**sal).eval()
    packed, alone, unpacked = packed_vs_alone(model, [[13, 22]])
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)
    # without seq_idx the second document sees the first: the test can tell
    assert (unpacked[:, 13:] - alone[:, 13:]).abs().max() > 1e-3


def test_packed_batch_rows_with_different_splits():
    """Two rows, split 13 + 22 and 20 + 1 + 14: a one-token document too."""
    model = every_block_model(inference="topk", kv="selected").eval()
    packed, alone, _ = packed_vs_alone(model, [[13, 22], [20, 1, 14]])
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-5)


def test_one_document_per_row_is_unpacked():
    """seq_idx of zeros (one document a row) gives what seq_idx=None gives."""
    model = every_block_model().eval()
    idx = torch.randint(0, VOCAB, (2, 27))
    with torch.no_grad():
        plain = model(idx).logits
        one_doc = model(idx, seq_idx=torch.zeros(2, 27, dtype=torch.int32)).logits
    torch.testing.assert_close(one_doc, plain, atol=1e-5, rtol=1e-5)


def _deterministic_select(self, s, seq_idx=None):
    """The training selection without Gumbel noise: hard argmax, straight-through softmax
    gradient. Per token, as the real one, but the same draw packed and alone."""
    y = torch.softmax(s, dim=-1)[..., 1]
    return (s[..., 1] > s[..., 0]).to(s.dtype) + y - y.detach()


@pytest.mark.parametrize("signal", ["selected", "all", "dense"])
def test_packed_gradients_equal_documents_alone(monkeypatch, signal):
    """Training mode, fp32: the gradient of the packed row's loss (token-mean cross-entropy +
    the SAL budget loss, per document as Eq. 7 holds each sequence) equals the gradient of the
    same loss summed from each document run alone."""
    monkeypatch.setattr(SALBlock, "select", _deterministic_select)
    model = every_block_model(signal=signal).train()
    lengths = [13, 22]
    L = sum(lengths)
    idx = torch.randint(0, VOCAB, (1, L))
    targets = torch.randint(0, VOCAB, (1, L))
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(idx, targets, seq_idx=seq_idx_of(*lengths)[None])
    assert out.aux_loss.requires_grad  # the budget loss takes part in the comparison
    packed = torch.autograd.grad(out.loss, params, allow_unused=True)

    loss = 0.0
    for s, e in ((0, 13), (13, L)):
        doc = model(idx[:, s:e], targets[:, s:e])
        # cross-entropy as a token mean over the row, the budget loss as a mean over documents
        loss = loss + doc.ce_loss * (e - s) / L + doc.aux_loss / len(lengths)
    alone = torch.autograd.grad(loss, params, allow_unused=True)
    for (name, _), g_packed, g_alone in zip(model.named_parameters(), packed, alone):
        assert (g_packed is None) == (g_alone is None), name
        if g_packed is not None:
            torch.testing.assert_close(g_packed, g_alone, atol=1e-6, rtol=1e-4, msg=name)


def test_topk_ranks_each_document_alone():
    """inference: topk with packed documents takes ceil(C n) tokens of each document of n."""
    sal = every_block_model(inference="topk", capacity=0.3).layers[1]
    d = torch.randn(2, 20)
    seq_idx = torch.stack([seq_idx_of(7, 13), seq_idx_of(1, 1, 18)])
    m = sal._topk_per_document(d, seq_idx)
    for r, lengths in enumerate([(7, 13), (1, 1, 18)]):
        start = 0
        for n in lengths:
            k = max(int(torch.tensor(0.3 * n).double().ceil()), 1)
            want = torch.zeros(n, dtype=torch.bool)
            want[d[r, start:start + n].topk(k).indices] = True
            assert torch.equal(m[r, start:start + n], want)
            start += n


def test_sequence_shares_per_document():
    m = torch.tensor([[1., 0., 1., 1., 0.], [0., 0., 0., 1., 1.]])
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    doc, n = documents(seq_idx)
    assert doc.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert n.tolist()[:3] == [2, 3, 5] and not n[3:].any()
    frac, real = sequence_shares(m, seq_idx)
    assert real.tolist() == [1, 1, 1] + [0] * 7
    torch.testing.assert_close(frac[:3], torch.tensor([0.5, 2 / 3, 0.4]))
    frac, real = sequence_shares(m, None)
    torch.testing.assert_close(frac, m.mean(1))


def test_reference_attention_masks_other_documents():
    """selective_attention_ref with seq_idx equals running each document alone."""
    q, k, v = (torch.randn(1, 19, 2, 8) for _ in range(3))
    q_mask = torch.rand(1, 19) < 0.6
    out = selective_attention_ref(q, k, v, q_mask, q_mask, window=6, seq_idx=seq_idx_of(8, 11)[None])
    for s, e in ((0, 8), (8, 19)):
        alone = selective_attention_ref(q[:, s:e], k[:, s:e], v[:, s:e], q_mask[:, s:e],
                                        q_mask[:, s:e], window=6)
        torch.testing.assert_close(out[:, s:e], alone)


# ------------------------------------------------------------------------------------------
# Triton selective_attention with seq_idx (interpreter on the CPU: 16 x 16 tiles)
# ------------------------------------------------------------------------------------------
TOL = {torch.float32: 5e-3 if CUDA else 1e-4, torch.bfloat16: 3e-2}


def _random_documents(b, L, n_docs, device):
    """seq_idx (b, L): each row cut at n_docs - 1 random distinct positions."""
    seq_idx = torch.zeros(b, L, dtype=torch.int32, device=device)
    for r in range(b):
        for cut in torch.randperm(L - 1)[: n_docs - 1] + 1:
            seq_idx[r, cut:] += 1
    return seq_idx


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _triton_case(b, L, hq, hkv, d, dtype, window, capacity, kv_mode, n_docs, device):
    sat = pytest.importorskip("hybridlab.kernels.selective_attention_triton")
    q, k, v = (torch.randn(b, L, h, d, device=device, dtype=dtype, requires_grad=True)
               for h in (hq, hkv, hkv))
    seq_idx = _random_documents(b, L, n_docs, device)
    q_mask = None if capacity is None else torch.rand(b, L, device=device) < capacity
    kv_mask = {"selected": q_mask, "random": torch.rand(b, L, device=device) < 0.5, None: None}[kv_mode]
    o = sat.selective_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=window, seq_idx=seq_idx)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref = selective_attention_ref(q32, k32, v32, q_mask, kv_mask, window, seq_idx=seq_idx)
    tol = TOL[dtype]
    assert not o.isnan().any(), "every output row must be written"
    assert _rel(o, o_ref) < tol
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), do.float())
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert not g.isnan().any(), f"every {name} row must be written"
        assert _rel(g, g_ref) < tol, name
    # the document mask matters here: without it the reference differs
    assert _rel(selective_attention_ref(q32, k32, v32, q_mask, kv_mask, window), o_ref) > 10 * tol


# (b, L, hq, hkv, dtype, window, capacity, kv_mode, documents per row)
TRITON_CASES = [
    pytest.param(2, 45, 2, 1, torch.float32, None, None, None, 3, id="dense-causal-gqa"),
    pytest.param(1, 70, 2, 2, torch.float32, 20, None, "random", 2, id="dense-window-kvrandom"),
    pytest.param(2, 53, 2, 2, torch.float32, 13, 0.5, "selected", 4, id="sel-kv=q-window-odd"),
    pytest.param(2, 48, 2, 1, torch.bfloat16, None, 0.4, "random", 3, id="sel-bf16-kvrandom-gqa"),
    pytest.param(1, 40, 2, 2, torch.bfloat16, 7, None, None, 5, id="dense-bf16-window<block"),
]


@pytest.mark.parametrize("b, L, hq, hkv, dtype, window, capacity, kv_mode, n_docs", TRITON_CASES)
def test_triton_selective_attention_with_seq_idx(b, L, hq, hkv, dtype, window, capacity, kv_mode, n_docs):
    _triton_case(b, L, hq, hkv, 16, dtype, window, capacity, kv_mode, n_docs, "cuda" if CUDA else "cpu")


def test_doc_bounds():
    sat = pytest.importorskip("hybridlab.kernels.selective_attention_triton")
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    start, end = sat._doc_bounds(seq_idx, 6)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6]


# ------------------------------------------------------------------------------------------
# real shapes, CUDA only
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("window, capacity, kv_mode", [(None, None, None), (512, 0.15, None),
                                                        (300, 0.3, "selected"), (None, 0.5, "random")])
def test_triton_selective_attention_with_seq_idx_gpu(window, capacity, kv_mode):
    _triton_case(2, 4093, 8, 2, 64, torch.bfloat16, window, capacity, kv_mode, 9, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("sal", SAL_VARIANTS)
def test_packed_logits_equal_each_document_alone_gpu(sal):
    """The whole model on the Triton kernels (conv, SSD, attention), fp32."""
    model = every_block_model(triton_shapes=True, **sal).cuda().eval()
    packed, alone, _ = packed_vs_alone(model, [[130, 221, 11], [300, 1, 61]], device="cuda")
    assert _rel(packed, alone) < 1e-3
