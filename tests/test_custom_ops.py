"""The kernels as torch.library custom ops (`hybridlab::*`): schema, fake (meta) functions and
autograd registration checked by `torch.library.opcheck` on the CPU implementation (the
reference); the same op with HYBRIDLAB_KERNELS=triton runs the Triton kernels (the interpreter
here) and matches the reference, forward and gradients; and torch.compile(fullgraph=True)
traces through each op as one node."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import grad_leaves, interpreter_only

sa = importlib.import_module("hybridlab.kernels.selective_attention")


def _sal_cases(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    b, L, hq, hkv, d = 2, 37, 4, 2, 16
    q = torch.randn(b, L, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, L, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, L, hkv, d, generator=g, dtype=dtype)
    q_mask = torch.rand(b, L, generator=g) < 0.4
    kv_mask = torch.rand(b, L, generator=g) < 0.5
    seq_idx = torch.tensor([[0] * 20 + [1] * 17, [0] * L])
    return {
        "selected, kv mask, window, documents": (q, k, v, q_mask, kv_mask, 8, None, seq_idx),
        "dense causal, explicit scale": (q, k, v, None, None, None, 0.3, None),
    }


@pytest.mark.parametrize("case", list(_sal_cases()))
def test_selective_attention_op_passes_opcheck(case):
    args = grad_leaves(_sal_cases()[case])
    torch.library.opcheck(sa._op, args)
    # its autograd (the written-out reference backward) equals autograd through the reference
    o = sa._op(*args)[0]
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, args[:3], do)
    want = torch.autograd.grad(sa.selective_attention_ref(*args), args[:3], do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@interpreter_only
@pytest.mark.parametrize("case", list(_sal_cases()))
def test_selective_attention_op_runs_the_triton_kernels_when_asked(monkeypatch, case):
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    monkeypatch.setattr(sa, "through_op", lambda: True)  # as under torch.compile (eager: the Function)
    args = grad_leaves(_sal_cases(torch.float32)[case])
    o = sa.selective_attention(*args)  # the public function -> the op -> the Triton kernels
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, args[:3], do)
    ref = sa.selective_attention_ref(*args)
    want = torch.autograd.grad(ref, args[:3], do)
    torch.testing.assert_close(o, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_selective_attention_op_compiles_as_one_graph():
    args = grad_leaves(_sal_cases(torch.float32)["selected, kv mask, window, documents"])
    fn = lambda *a: sa._op(*a)[0]  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    o = compiled(*args)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, args[:3], do)
    want = torch.autograd.grad(fn(*args), args[:3], do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_selective_attention_op_compiles_with_inductor_on_cuda():
    """On CUDA the op runs the Triton kernels; inductor compiles around it (one extern node
    each way) and gives eager's output and gradients."""
    args = [a.cuda() if isinstance(a, torch.Tensor) else a
            for a in _sal_cases(torch.bfloat16)["selected, kv mask, window, documents"]]
    args = grad_leaves(args)

    def fn(q, k, v, *rest):
        return (sa.selective_attention(q * 2, k, v, *rest) + 1).float().square().mean()

    compiled = torch.compile(fn, fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args[:3])
    want = torch.autograd.grad(fn(*args), args[:3])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
