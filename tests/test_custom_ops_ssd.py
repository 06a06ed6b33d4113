"""The chunked SSD scan as torch.library custom ops (`hybridlab::ssd_chunked` and its backward):
opcheck on the CPU implementation (the reference), the op's gradients equal autograd through
the reference, HYBRIDLAB_KERNELS=triton sends the public `ssd_chunked` through the op to the
Triton kernels (the interpreter here), and torch.compile(fullgraph=True) traces the op as one
node."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.helpers import interpreter_only

ssd = importlib.import_module("hybridlab.kernels.ssd")

NAMES = ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "dt_softplus", "dt_limit",
         "initial_states", "seq_idx")
GRAD = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")  # differentiable inputs


def _inputs(dtype=torch.float64, full=True):
    """The op's arguments, by name: b=2, l=37 (three chunks of 16, the last partial), h=4, p=8,
    g=2, n=16. full: D (h, p), z, dt_bias, dt_limit, initial_states and two documents in row 0."""
    g = torch.Generator().manual_seed(0)
    b, l, h, p, ng, n = 2, 37, 4, 8, 2, 16
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -(torch.rand(h, generator=g, dtype=dtype) + 0.5)
    a = dict(x=rnd(b, l, h, p), dt=rnd(b, l, h) * 0.5 - 1.0, A=A, B=rnd(b, l, ng, n), C=rnd(b, l, ng, n),
             chunk_size=16, D=None, z=None, dt_bias=None, dt_softplus=True, dt_limit=None,
             initial_states=None, seq_idx=None)
    if full:
        a.update(D=rnd(h, p), z=rnd(b, l, h, p), dt_bias=rnd(h) * 0.3, dt_limit=[0.05, 2.0],
                 initial_states=rnd(b, h, p, n),
                 seq_idx=torch.tensor([[0] * 20 + [1] * 17, [0] * l]))  # int64: the wrapper casts
    return {k: v.detach().requires_grad_() if k in GRAD and v is not None else v for k, v in a.items()}


def _ref(a, **kw):
    kw = {**{k: v for k, v in a.items() if k not in ("x", "dt", "A", "B", "C")}, **kw}
    if kw["dt_limit"] is not None:
        kw["dt_limit"] = tuple(kw["dt_limit"])
    return ssd.ssd_chunked_ref(a["x"], a["dt"], a["A"], a["B"], a["C"], **kw)


def _leaves(a):
    return [a[k] for k in GRAD if a[k] is not None]


CASES = {
    "D (h, p), z, dt_bias, dt_limit, initial states, documents": dict(full=True),
    "bare": dict(full=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ssd_op_passes_opcheck(case):
    a = _inputs(**CASES[case])
    torch.library.opcheck(ssd._op, tuple(a[k] for k in NAMES))
    # its autograd (the reference's vjp inside the backward op) equals autograd through the
    # reference, for y and for the final states
    y, final = ssd._op(*(a[k] for k in NAMES))[:2]
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    got = torch.autograd.grad((y, final), _leaves(a), (dy, dfinal))
    want = torch.autograd.grad(_ref(a, return_final_states=True), _leaves(a), (dy, dfinal))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_ssd_op_gradient_without_final_states_equals_the_reference():
    """final_states unused: its gradient arrives as None, and the rest is unchanged."""
    a = _inputs(full=True)
    y = ssd._op(*(a[k] for k in NAMES))[0]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, _leaves(a), dy)
    want = torch.autograd.grad(_ref(a), _leaves(a), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _spy_on_triton(monkeypatch):
    """Record the Triton host functions' calls (and the dfinal each backward got)."""
    st = importlib.import_module("hybridlab.kernels.ssd_triton")
    calls = {"forward": 0, "dfinal": []}
    fwd, bwd = st.forward, st.backward

    def forward(*args):
        calls["forward"] += 1
        return fwd(*args)

    def backward(dy, dfinal, *args):
        calls["dfinal"].append(dfinal)
        return bwd(dy, dfinal, *args)

    monkeypatch.setattr(st, "forward", forward)
    monkeypatch.setattr(st, "backward", backward)
    return calls


@interpreter_only
def test_ssd_op_runs_the_triton_kernels_when_asked(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    monkeypatch.setattr(ssd, "through_op", lambda: True)  # as under torch.compile (eager: the Function)
    calls = _spy_on_triton(monkeypatch)
    a = _inputs(torch.float32, full=True)
    a["D"] = a["D"][:, 0].detach().requires_grad_()  # D (h,): its gradient summed over p
    a["dt_limit"] = (0.2, 0.6)  # a tuple, as models pass it; clamps both ends here
    kw = {k: a[k] for k in NAMES[5:]}
    # the public function -> the op -> the Triton kernels (the interpreter)
    y, final = ssd.ssd_chunked(a["x"], a["dt"], a["A"], a["B"], a["C"], **kw, return_final_states=True)
    y_r, final_r = _ref(a, return_final_states=True)
    torch.testing.assert_close(y, y_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, final_r, atol=1e-4, rtol=1e-4)
    dy, dfinal = torch.randn_like(y_r), torch.randn_like(final_r)
    got = torch.autograd.grad((y, final), _leaves(a), (dy, dfinal))
    want = torch.autograd.grad((y_r, final_r), _leaves(a), (dy, dfinal))
    for name, g, w in zip([k for k in GRAD if a[k] is not None], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)
    assert calls["forward"] == 1 and len(calls["dfinal"]) == 1 and calls["dfinal"][0] is not None


@interpreter_only
def test_public_ssd_chunked_compiles_to_one_op_node(monkeypatch):
    """torch.compile(fullgraph=True) of the public function (the way models call it) traces the
    dispatcher and sees the scan as one op; an unused final state sends the backward no dfinal."""
    pytest.importorskip("triton")
    monkeypatch.setenv("HYBRIDLAB_KERNELS", "triton")
    calls = _spy_on_triton(monkeypatch)
    a = _inputs(torch.float32, full=False)
    a["D"] = torch.randn(a["x"].shape[2]).requires_grad_()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = lambda x, dt, A, B, C, D: ssd.ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D)  # noqa: E731
    leaves = _leaves(a)
    y = torch.compile(fn, fullgraph=True, backend=backend)(*leaves)
    ops = [nd.target for gm in graphs for nd in gm.graph.nodes if nd.op == "call_function"
           and "hybridlab" in str(nd.target)]
    assert ops == [torch.ops.hybridlab.ssd_chunked.default]
    y_r = _ref(a)
    torch.testing.assert_close(y, y_r, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(y_r)
    for g, w in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_r, leaves, dy)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert calls["dfinal"] == [None]


def test_ssd_op_compiles_as_one_graph():
    a = _inputs(torch.float32, full=True)
    fn = lambda *args: ssd._op(*args)[:2]  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = tuple(a[k] for k in NAMES)
    y, final = compiled(*args)
    y_e, final_e = fn(*args)
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(final, final_e)
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    got = torch.autograd.grad((y, final), _leaves(a), (dy, dfinal))
    want = torch.autograd.grad((y_e, final_e), _leaves(a), (dy, dfinal))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_toy_head_and_state_sizes_run_the_reference_on_the_gpu():
    """P < 16 and N < 16 together faulted in the Triton backward on the GPU (bf16): there the
    scan and the Mamba-2 mixer take the reference (tests/test_train.py's CUDA case trains such
    a model); the interpreter keeps the kernels, which run these sizes correctly."""
    from hybridlab.kernels import ssd
    assert not ssd.triton_shape(8, 8)
    assert ssd.triton_shape(8, 16) and ssd.triton_shape(16, 8) and ssd.triton_shape(64, 128)
    assert ssd.triton_shape(8, 8, on_gpu=False)
