"""Causal conv1d, gated RMSNorm and the fused LM head + cross-entropy as torch.library custom
ops (`hybridlab::*`), checked as tests/test_custom_ops.py checks selective attention: opcheck on
the CPU implementation (the reference), the op's gradients against autograd through the
reference, the public function through the op to the Triton kernels (interpreter) with
HYBRIDLAB_KERNELS=triton, and torch.compile(fullgraph=True) over the op as one node."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import grad_leaves, interpreter_only

conv = importlib.import_module("hybridlab.kernels.conv1d")
norm = importlib.import_module("hybridlab.kernels.norm")
ce = importlib.import_module("hybridlab.kernels.cross_entropy")


def _diff(args):
    """The arguments gradients flow to."""
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _grads(out, args, g):
    return torch.autograd.grad(out, _diff(args), g)


def _assert_close(got, want, **tol):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------------------------
# cases: tiny shapes, odd lengths, as the op's arguments; the reference and the public function
# (called the way models call it) take the same arguments.


def _conv_cases(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    b, l, d, k = 2, 19, 6, 4
    x = torch.randn(b, l, d, generator=g, dtype=dtype)
    w = 0.5 * torch.randn(d, k, generator=g, dtype=dtype)
    bias = 0.2 * torch.randn(d, generator=g, dtype=dtype)
    seq = torch.tensor([[0] * 5 + [1] + [2] * 13, [0] * l], dtype=torch.int32)  # incl. a 1-token document
    return {
        "packed, bias, silu": (x, w, bias, seq, True),
        "no bias, no activation": (x, w[:, :3].contiguous(), None, None, False),
    }


def _conv_ref(x, w, bias, seq, silu):
    return conv.causal_conv1d_ref(x, w, bias, seq, "silu" if silu else None)


def _conv_public(x, w, bias, seq, silu):
    return conv.causal_conv1d(x, w, bias, seq_idx=seq, activation="silu" if silu else None)


def _norm_cases(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shape, d = (2, 7, 12), 12
    x = torch.randn(*shape, generator=g, dtype=dtype)
    z = torch.randn(*shape, generator=g, dtype=dtype)
    w = 1 + 0.1 * torch.randn(d, generator=g, dtype=dtype)
    return {
        "gated after the norm, groups": (x, z, w, 1e-5, 4, False, None),
        "plain rms norm": (x, None, w, 1e-5, None, False, None),
        # as an fp32 residual stream's norm under bf16 autocast: the output narrower than x
        "rms norm out in a narrower dtype": (x, None, w, 1e-5, None, False, torch.float32),
    }


def _norm_ref(x, z, w, eps, group_size, nbg, out_dtype):
    return norm.gated_rms_norm_ref(x, z, w, eps, group_size, nbg, out_dtype)


def _norm_public(x, z, w, eps, group_size, nbg, out_dtype):
    if z is None and group_size is None:
        return norm.rms_norm(x, w, eps, out_dtype)
    return norm.gated_rms_norm(x, z, w, eps, group_size, nbg)


def _ce_cases(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    n, d, V = 13, 8, 37
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(V, d, generator=g, dtype=dtype) * 2 / d ** 0.5
    t = torch.randint(0, V, (n,), generator=g)
    t[::4] = -100  # ignored positions
    return {"ignored targets, several chunks": (h, w, t, 5, -100, True, True)}


def _ce_ref(h, w, t, chunk, ignore_index, *need):
    return ce.linear_cross_entropy_ref(h, w, t, ignore_index)


def _ce_public(h, w, t, chunk, ignore_index, *need):
    return ce.linear_cross_entropy(h, w, t, chunk, ignore_index)


MODULES = {"causal_conv1d": conv, "gated_rms_norm": norm, "linear_cross_entropy": ce}
OPS = {  # name: (op, cases, reference, public function, tolerances for fp32 through the kernels)
    "causal_conv1d": (conv._op, _conv_cases, _conv_ref, _conv_public, dict(atol=1e-5, rtol=1e-5)),
    "gated_rms_norm": (norm._op, _norm_cases, _norm_ref, _norm_public, dict(atol=1e-5, rtol=1e-5)),
    "linear_cross_entropy": (ce._op, _ce_cases, _ce_ref, _ce_public, dict(atol=1e-5, rtol=1e-5)),
}
TRITON = {"causal_conv1d": "conv1d_triton", "gated_rms_norm": "norm_triton",
          "linear_cross_entropy": "cross_entropy_triton"}
CASES = [(name, case) for name, (_, cases, *_) in OPS.items() for case in cases()]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,case", CASES)
def test_op_passes_opcheck(name, case):
    op, cases, ref, _, _ = OPS[name]
    args = grad_leaves(cases()[case])
    torch.library.opcheck(op, args)
    # its autograd (the reference's gradients through the backward) equals autograd through it
    out = _first(op(*args))
    g = torch.randn_like(out)
    _assert_close(_grads(out, args, g), _grads(ref(*args), args, g))


@interpreter_only
@pytest.mark.parametrize("name", list(OPS))
def test_op_runs_the_triton_kernels_when_asked(name, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    _, cases, ref, public, tol = OPS[name]
    args = grad_leaves(next(iter(cases(torch.float32).values())))
    monkeypatch.setattr(MODULES[name], "through_op", lambda: True)  # as under torch.compile
    kernels = importlib.import_module(f"hybridlab.kernels.{TRITON[name]}")
    calls = []
    for fn in ("forward", "backward"):  # count the Triton host functions' calls
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _fn=fn, _real=real: calls.append(_fn) or _real(*a))
    out = public(*args)  # the public function -> the op -> the Triton kernels (interpreter)
    g = torch.randn_like(out)
    got = _grads(out, args, g)
    # cross-entropy's gradients come from its forward; its backward only scales them
    assert calls == (["forward"] if name == "linear_cross_entropy" else ["forward", "backward"])
    want_out = ref(*args)
    torch.testing.assert_close(out, want_out, **tol)
    _assert_close(got, _grads(want_out, args, g), **tol)


@interpreter_only
@pytest.mark.parametrize("name", list(OPS))
def test_public_function_goes_through_the_op(name, monkeypatch):
    """With the Triton backend, the dispatcher calls the op where torch.compile traces
    (`through_op`) and the kernels' autograd.Function in eager calls (less host time); without
    it, the reference's plain autograd."""
    pytest.importorskip("triton")
    op, cases, ref, public, tol = OPS[name]
    args = next(iter(cases(torch.float32).values()))
    module = MODULES[name]
    calls = []
    monkeypatch.setattr(module, "_op", lambda *a: calls.append(a) or op(*a))
    public(*args)
    assert not calls
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    torch.testing.assert_close(public(*args), ref(*args), **tol)  # the Triton kernels, eagerly
    assert not calls
    monkeypatch.setattr(module, "through_op", lambda: True)
    public(*args)
    assert len(calls) == 1


@pytest.mark.parametrize("name", list(OPS))
def test_op_compiles_as_one_graph(name):
    op, cases, _, _, _ = OPS[name]
    args = grad_leaves(next(iter(cases(torch.float32).values())))
    fn = lambda *a: _first(op(*a))  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    g = torch.randn_like(out)
    want = fn(*args)
    torch.testing.assert_close(out, want)
    _assert_close(_grads(out, args, g), _grads(want, args, g))


@interpreter_only
def test_cross_entropy_op_makes_only_the_gradients_asked_for(monkeypatch):
    """Evaluation and frozen weights make no gradient buffers (the fused forward's memory)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    h, w, t, chunk, ignore_index, *_ = _ce_cases(torch.float32)["ignored targets, several chunks"]
    monkeypatch.setattr(ce, "through_op", lambda: True)
    seen = []
    op = ce._op
    monkeypatch.setattr(ce, "_op", lambda *a: seen.append(a[-2:]) or op(*a))
    h, w = h.requires_grad_(), w.requires_grad_()
    with torch.no_grad():
        ce.linear_cross_entropy(h, w, t, chunk, ignore_index)
    loss = ce.linear_cross_entropy(h, w.detach(), t, chunk, ignore_index)
    (gh,) = torch.autograd.grad(loss * 2.0, h)
    assert seen == [(False, False), (True, False)]
    want = torch.autograd.grad(ce.linear_cross_entropy_ref(h, w, t, ignore_index) * 2.0, h)[0]
    torch.testing.assert_close(gh, want, atol=1e-5, rtol=1e-5)


@interpreter_only
def test_public_functions_compile_to_one_node_per_kernel(monkeypatch):
    """A Mamba-2-like chain through the public functions (conv, gated norm, LM head + CE) with
    the Triton backend: one graph, each kernel one op node forward and backward, and the same
    loss and gradients as eager."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(kind):  # aot_eager that keeps the forward and backward graphs
        def compiler(gm, _):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    g = torch.Generator().manual_seed(3)
    b, l, d, V = 2, 9, 8, 23
    x, z = (torch.randn(b, l, d, generator=g) for _ in range(2))
    args = grad_leaves([x, z, 0.5 * torch.randn(d, 4, generator=g), torch.ones(d),
                       torch.randn(V, d, generator=g) / 3])
    targets = torch.randint(0, V, (b * l,), generator=g)

    def chain(x, z, conv_w, norm_w, head):
        y = conv.causal_conv1d(x, conv_w)
        y = norm.gated_rms_norm(y, z, norm_w, 1e-5, 4)
        return ce.linear_cross_entropy(y.reshape(b * l, d), head, targets, 7)

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    loss = torch.compile(chain, fullgraph=True, backend=backend)(*args)
    got = torch.autograd.grad(loss, args)

    def ops(kind):
        return [str(n.target) for n in graphs[kind].graph.nodes
                if n.op == "call_function" and str(n.target).startswith("hybridlab.")]

    assert ops("forward") == ["hybridlab.causal_conv1d.default", "hybridlab.gated_rms_norm.default",
                              "hybridlab.linear_cross_entropy.default"]
    # cross-entropy's backward is two products (no kernel)
    assert ops("backward") == ["hybridlab.gated_rms_norm_backward.default",
                               "hybridlab.causal_conv1d_backward.default"]
    want = chain(*args)
    torch.testing.assert_close(loss, want)
    _assert_close(got, torch.autograd.grad(want, args))
