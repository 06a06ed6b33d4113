"""Mamba-2's mixer as one custom op (`hybridlab::mamba2_mixer`, kernels/mamba2_mixer.py):
opcheck and gradients of the CPU implementation against autograd through the composed
references; and, with the Triton kernels (the interpreter here), one compiled node whose
backward writes the in-projection's gradient in place and matches the references."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import interpreter_only

mixer = importlib.import_module("hybridlab.kernels.mamba2_mixer")

H, P, G, N, K = 4, 8, 2, 8, 4      # heads, headdim, groups, state, conv width
D_INNER, CONV_DIM = H * P, H * P + 2 * G * N


def _inputs(dtype, documents):
    """The op's tensors (b=2, l=37: three chunks of 16, the last partial) and its options."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    t = dict(zxbcdt=rnd(2, 37, D_INNER + CONV_DIM + H), conv_weight=rnd(CONV_DIM, K) * 0.5,
             conv_bias=rnd(CONV_DIM) * 0.1, A=-(torch.rand(H, generator=g, dtype=dtype) + 0.5),
             D=rnd(H), dt_bias=rnd(H) * 0.3, norm_weight=1 + 0.1 * rnd(D_INNER))
    t = {k: v.requires_grad_() for k, v in t.items()}
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [0] * 37], dtype=torch.int32) if documents else None
    options = dict(nheads=H, headdim=P, ngroups=G, chunk_size=16, norm_eps=1e-5, norm_group_size=D_INNER // G,
                   norm_before_gate=False, seq_idx=seq_idx)
    return t, options


def _call(fn, t, options):
    o = options
    return fn(t["zxbcdt"], t["conv_weight"], t["conv_bias"], t["A"], t["D"], t["dt_bias"], t["norm_weight"],
              o["nheads"], o["headdim"], o["ngroups"], o["chunk_size"], o["norm_eps"], o["norm_group_size"],
              o["norm_before_gate"], o["seq_idx"])


@pytest.mark.parametrize("documents", [False, True], ids=["one sequence a row", "packed documents"])
def test_mixer_op_passes_opcheck_and_matches_the_references(documents):
    t, options = _inputs(torch.float64, documents)
    args = (*t.values(), *(options[k] for k in ("nheads", "headdim", "ngroups", "chunk_size", "norm_eps",
                                                 "norm_group_size", "norm_before_gate", "seq_idx")))
    torch.library.opcheck(mixer._op, args)
    out = mixer._op(*args)[0]
    want = _call(mixer.mamba2_mixer_ref, t, options)
    torch.testing.assert_close(out, want)
    dout = torch.randn_like(out)
    for name, g, w in zip(t, torch.autograd.grad(out, list(t.values()), dout),
                          torch.autograd.grad(want, list(t.values()), dout)):
        torch.testing.assert_close(g, w, msg=name)


@interpreter_only
def test_mixer_compiles_to_one_node_and_its_kernels_fill_one_gradient(monkeypatch):
    """HYBRIDLAB_KERNELS=triton: the public function under torch.compile(fullgraph) is one
    `mamba2_mixer` node; the Triton backward (the norm's dz, the scan's ddt, the conv's dx, each
    written into its view of d(zxbcdt)) gives the references' gradients."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    t, options = _inputs(torch.float32, documents=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(lambda **t: _call(mixer.mamba2_mixer, t, options), fullgraph=True, backend=backend)(**t)
    ops = [nd.target for gm in graphs for nd in gm.graph.nodes if nd.op == "call_function"
           and "hybridlab" in str(nd.target)]
    assert ops == [torch.ops.hybridlab.mamba2_mixer.default]
    want = _call(mixer.mamba2_mixer_ref, t, options)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    dout = torch.randn_like(out)
    for name, g, w in zip(t, torch.autograd.grad(out, list(t.values()), dout),
                          torch.autograd.grad(want, list(t.values()), dout)):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4, msg=name)


@pytest.mark.gpu
def test_mixer_op_on_cuda_matches_the_references():
    """A taipan-190m layer's mixer (24 heads of 64, state 128, one group) in bf16 on the GPU,
    through the op (the Triton kernels, d(zxbcdt) written in place), against the references
    in fp32 on the same inputs: relative errors of the output and every gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h, p, ng, n, k, b, l = 24, 64, 1, 128, 4, 2, 1000
    d_inner, conv_dim = h * p, h * p + 2 * ng * n
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    t = dict(zxbcdt=rnd(b, l, d_inner + conv_dim + h).bfloat16(), conv_weight=rnd(conv_dim, k) * 0.5,
             conv_bias=rnd(conv_dim) * 0.1, A=-(torch.rand(h, generator=g, device="cuda") + 0.5), D=rnd(h),
             dt_bias=rnd(h) * 0.3 - 1.0, norm_weight=1 + 0.1 * rnd(d_inner))
    t = {k_: v.requires_grad_() for k_, v in t.items()}
    t32 = {k_: v.detach().float().requires_grad_() for k_, v in t.items()}
    seq = (torch.arange(l, device="cuda") >= 600).int()[None].expand(b, l).contiguous()
    options = dict(nheads=h, headdim=p, ngroups=ng, chunk_size=256, norm_eps=1e-5, norm_group_size=d_inner,
                   norm_before_gate=False, seq_idx=seq)
    out = _call(lambda *a: mixer._op(*a)[0], t, options)
    want = _call(mixer.mamba2_mixer_ref, t32, options)
    rel = lambda a, b_: ((a.float() - b_).norm() / b_.norm()).item()  # noqa: E731
    assert rel(out, want) < 2e-2
    dout = torch.randn_like(want)
    got = torch.autograd.grad(out, list(t.values()), dout.bfloat16())
    ref = torch.autograd.grad(want, list(t32.values()), dout)
    errs = {name: rel(a, b_) for name, a, b_ in zip(t, got, ref)}
    assert all(e < 5e-2 for e in errs.values()), errs


@interpreter_only
def test_mixer_kernels_in_bf16_with_fp32_parameters(monkeypatch):
    """As autocast trains it: bf16 activations (zxbcdt), fp32 parameters. Through the op with the
    Triton kernels (interpreter), against the references in fp32 on the same values; every
    gradient comes back in its input's dtype."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    t, options = _inputs(torch.float32, documents=True)
    t = {k: (v.detach().bfloat16() if k == "zxbcdt" else v.detach()).requires_grad_() for k, v in t.items()}
    t32 = {k: v.detach().float().requires_grad_() for k, v in t.items()}
    out = _call(lambda *a: mixer._op(*a)[0], t, options)
    want = _call(mixer.mamba2_mixer_ref, t32, options)
    assert out.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, want) < 2e-2
    dout = torch.randn_like(want)
    got = torch.autograd.grad(out, list(t.values()), dout.bfloat16())
    ref = torch.autograd.grad(want, list(t32.values()), dout)
    for name, g, w in zip(t, got, ref):
        assert g.dtype == t[name].dtype, name
        assert rel(g, w) < 5e-2, (name, rel(g, w))


@pytest.mark.parametrize("kernels", ["reference", pytest.param("triton", marks=interpreter_only)])
def test_mixer_op_takes_padded_rows(monkeypatch, kernels):
    """Where Inductor hands the ops the in-projection's output with other row strides (padded,
    say), they ask only for the traced stride order and take it as it is, with the same output
    and gradients as on contiguous rows."""
    if kernels == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", kernels)
    for op in (torch.ops.hybridlab.mamba2_mixer.default, torch.ops.hybridlab.mamba2_mixer_backward.default):
        assert torch.Tag.needs_fixed_stride_order in op.tags
    t, options = _inputs(torch.float32, documents=True)
    width = t["zxbcdt"].shape[-1]
    padded = torch.full((2, 37, width + 24), float("nan"))[..., :width]   # rows of width + 24
    padded.copy_(t["zxbcdt"].detach())
    padded.requires_grad_()
    assert padded.stride(1) == width + 24
    runs = []
    for zxbcdt in (t["zxbcdt"], padded):
        out = _call(lambda *a: mixer._op(*a)[0], {**t, "zxbcdt": zxbcdt}, options)
        args = [zxbcdt] + [v for k, v in t.items() if k != "zxbcdt"]
        runs.append((out, *torch.autograd.grad(out, args, torch.ones_like(out))))
    for name, a, b in zip(["out", *t], *runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_eager_splits_backpropagate_as_one_concatenation():
    """The eager path's views of zxbcdt and xBC come from torch.split, whose backward is one
    concatenation; slices each filled a zero tensor of the whole width and summed the three
    (the likely cause of eager's 147.0 ms a taipan-190m step against 129.8 ms with split, both
    on the H200 in the twelfth session)."""
    zxbcdt = torch.randn(2, 5, D_INNER + CONV_DIM + H, requires_grad=True)
    views = [*mixer.mixer_split(zxbcdt, H, P), *mixer.xbc_split(zxbcdt[..., :CONV_DIM], H, P, G)]
    assert [tuple(v.shape) for v in views] == [(2, 5, D_INNER), (2, 5, CONV_DIM), (2, 5, H), (2, 5, H, P),
                                               (2, 5, G, N), (2, 5, G, N)]
    for v in views:
        fn = v.grad_fn
        while type(fn).__name__.startswith(("View", "UnsafeView", "Unflatten")):
            fn = fn.next_functions[0][0]
        assert type(fn).__name__.startswith("SplitWithSizesBackward"), type(fn).__name__
