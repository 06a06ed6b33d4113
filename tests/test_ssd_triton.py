"""Triton SSD chunked scan and decode step against the pure-torch references.

Forward output, final state and every gradient (x, dt, A, B, C, D, z, dt_bias, initial_states)
are compared by relative error ||a - b|| / ||b||. The reference runs in fp32 on the same
(rounded) inputs, so the bound measures the kernel's own error. On the CPU the kernels run
under TRITON_INTERPRET=1 (tiny shapes, exact fp32 dots); on CUDA the `gpu` cases run real
shapes (bf16 tensor cores, tf32 for fp32 inputs).
"""
import pytest
import torch

from tests.helpers import interpreter_only  # CUDA machines run the gpu cases below instead

pytest.importorskip("triton")
import hybridlab.kernels.ssd_triton as ssd_triton  # noqa: E402  (the Triton path, explicitly)
from hybridlab.kernels.ssd import ssd_chunked_ref, ssd_naive, ssd_step_ref  # noqa: E402

# Relative-error bounds per device and input dtype. CPU: the interpreter's dots are exact fp32,
# so only the bf16/fp16 rounding of inputs, stored outputs and matmul operands remains.
# GPU: fp32 inputs go through tf32 tensor cores.
TOL = {
    "cpu": {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2},
    "cuda": {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2},
}
# Gradients that are sums over the whole batch and sequence (A, dt_bias, D) cancel more.
LOOSE = {"A", "dt_bias", "D"}


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b, l, h, g, p, n, dtype, device, D="h", z=True, dt_bias=True, init=True,
                boundaries=()):
    """Random SSD inputs shaped like a Mamba-2 layer's (dt around softplus(-1..0), A < 0)."""
    x = torch.randn(b, l, h, p, device=device).to(dtype)
    dt = (torch.randn(b, l, h, device=device) * 0.5 - 1.0).to(dtype)
    A = -(torch.rand(h, device=device) * 2.0 + 0.3)
    B = torch.randn(b, l, g, n, device=device).to(dtype)
    C = torch.randn(b, l, g, n, device=device).to(dtype)
    kw = {}
    if D == "h":
        kw["D"] = torch.randn(h, device=device)
    elif D == "hp":
        kw["D"] = torch.randn(h, p, device=device)
    if z:
        kw["z"] = torch.randn(b, l, h, p, device=device).to(dtype)
    if dt_bias:
        kw["dt_bias"] = torch.randn(h, device=device) * 0.3
    if init:
        kw["initial_states"] = torch.randn(b, h, p, n, device=device)
    if boundaries:
        seq = torch.zeros(b, l, dtype=torch.int32, device=device)
        for pos in boundaries:
            seq[:, pos:] += 1
        kw["seq_idx"] = seq
    return (x, dt, A, B, C), kw


def check_against_ref(shape, dtype, device, chunk_size, tol_scale=1.0, **opts):
    b, l, h, g, p, n = shape
    args, kw = make_inputs(b, l, h, g, p, n, dtype, device, **opts)
    diff = {k: v for k, v in kw.items() if torch.is_tensor(v) and v.is_floating_point()}
    names = ["x", "dt", "A", "B", "C"] + list(diff)

    # kernel: leaves in the test dtype
    leaves = [a.detach().clone().requires_grad_() for a in args]
    kw_k = {**kw, **{k: v.detach().clone().requires_grad_() for k, v in diff.items()}}
    y, final = ssd_triton.ssd_chunked(*leaves, chunk_size=chunk_size, return_final_states=True, **kw_k)
    # reference: the same values in fp32
    leaves_r = [a.detach().float().requires_grad_() for a in args]
    kw_r = {**kw, **{k: v.detach().float().requires_grad_() for k, v in diff.items()}}
    y_r, final_r = ssd_chunked_ref(*leaves_r, chunk_size=chunk_size, return_final_states=True, **kw_r)

    assert y.dtype == dtype and y.shape == y_r.shape
    assert final.dtype == torch.float32 and final.shape == (b, h, p, n)
    tol = TOL[device][dtype] * tol_scale
    errs = {"y": rel_err(y, y_r), "final_states": rel_err(final, final_r)}

    dy = torch.randn_like(y_r)
    dfinal = torch.randn_like(final_r)
    ((y.float() * dy).sum() + (final * dfinal).sum()).backward()
    ((y_r * dy).sum() + (final_r * dfinal).sum()).backward()
    grads = dict(zip(names, leaves + [kw_k[k] for k in diff]))
    grads_r = dict(zip(names, leaves_r + [kw_r[k] for k in diff]))
    for k in names:
        assert grads[k].grad is not None, f"no gradient for {k}"
        assert grads[k].grad.shape == grads_r[k].grad.shape
        errs["d" + k] = rel_err(grads[k].grad, grads_r[k].grad)
    bad = {k: e for k, e in errs.items() if e > tol * (3 if k[1:] in LOOSE else 1)}
    assert not bad, f"rel errors over {tol:g}: {bad} (all: {errs})"
    return errs


# (id, shape (b, l, h, g, p, n), chunk, options). Lengths are not multiples of the chunk.
CPU_CASES = [
    ("basic", (1, 100, 2, 1, 16, 16), 32, dict()),
    ("chunk64", (1, 100, 2, 1, 16, 32), 64, dict(D="hp", z=False)),
    ("chunk64_rowblocks", (1, 150, 2, 1, 16, 16), 64, dict()),  # several row blocks; last chunk 22 rows
    ("groups_packed", (1, 96, 4, 2, 16, 16), 32, dict(boundaries=(37, 70))),
    ("packed_edges", (1, 80, 2, 1, 16, 16), 32, dict(boundaries=(20, 64), z=False)),
    # chunks of two row blocks: one holding a single document (the unmasked fast path, also at a
    # boundary on the chunk's start), others mixed
    ("packed_chunk64", (2, 150, 2, 1, 16, 16), 64, dict(boundaries=(40, 130))),
    ("packed_chunk64_at_start", (1, 150, 2, 1, 16, 16), 64, dict(boundaries=(64,), z=False)),
    ("bare", (1, 50, 2, 1, 16, 16), 32, dict(D=None, z=False, dt_bias=False, init=False)),
    ("dt_limit", (1, 64, 2, 1, 16, 16), 32, dict(dt_limit=(0.1, 0.5))),
]


def _case_kwargs(opts):
    opts = dict(opts)
    limit = opts.pop("dt_limit", None)
    return opts, ({"dt_limit": limit} if limit else {})


def _run_case(shape, chunk, opts, dtype, device):
    opts, extra = _case_kwargs(opts)
    if extra:
        # dt_limit is a plain option of the scan, not an input tensor
        return _run_with_limit(shape, chunk, opts, dtype, device, extra["dt_limit"])
    return check_against_ref(shape, dtype, device, chunk, **opts)


def _run_with_limit(shape, chunk, opts, dtype, device, limit):
    b, l, h, g, p, n = shape
    args, kw = make_inputs(b, l, h, g, p, n, dtype, device, **opts)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    leaves_r = [a.detach().float().requires_grad_() for a in args]
    bias = kw["dt_bias"].detach().clone().requires_grad_()
    bias_r = kw["dt_bias"].detach().clone().requires_grad_()
    rest = {k: v for k, v in kw.items() if k != "dt_bias"}
    y = ssd_triton.ssd_chunked(*leaves, chunk_size=chunk, dt_bias=bias, dt_limit=limit, **rest)
    y_r = ssd_chunked_ref(*leaves_r, chunk_size=chunk, dt_bias=bias_r, dt_limit=limit,
                          **{k: (v.float() if v.is_floating_point() else v) for k, v in rest.items()})
    tol = TOL[device][dtype]
    assert rel_err(y, y_r) < tol
    dy = torch.randn_like(y_r)
    (y.float() * dy).sum().backward()
    (y_r * dy).sum().backward()
    for name, a, a_r in zip(["x", "dt", "A", "B", "C"], leaves, leaves_r):
        assert rel_err(a.grad, a_r.grad) < tol * (3 if name == "A" else 1), name
    assert rel_err(bias.grad, bias_r.grad) < 3 * tol


@interpreter_only
@pytest.mark.parametrize("case", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_chunked_fp32_cpu(case):
    _, shape, chunk, opts = case
    _run_case(shape, chunk, opts, torch.float32, "cpu")


@interpreter_only
@pytest.mark.parametrize("split_target", [1, 10**9], ids=["heads_in_one_program", "split_per_head"])
def test_head_sum_split_cpu(monkeypatch, split_target):
    """dB/dC sum a group's heads inside one program, or over split programs: same gradients.
    Three heads per group (not a power of two) so the per-head dcs rows are partly masked."""
    monkeypatch.setattr(ssd_triton, "_SPLIT_TARGET", split_target)
    check_against_ref((1, 70, 6, 2, 16, 16), torch.float32, "cpu", 32, boundaries=(33,))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_low_precision_cpu(dtype):
    # the interpreter computes dots in fp32 (its bf16 dot is broken), the rest in the real dtype
    check_against_ref((1, 64, 2, 1, 16, 16), dtype, "cpu", 32, boundaries=(41,))


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interpreter_only),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_strided_views_as_in_mamba2(device):
    """x, B, C as views of one xBC buffer and dt of an in-projection-like buffer (Mamba-2's
    layout, which the kernels read without a copy): the same outputs and gradients as on
    contiguous copies; and the backward can write dx, dB, dC straight into one d(xBC) buffer."""
    b, l, h, g, p, n, Q = (1, 70, 4, 2, 16, 16, 32) if device == "cpu" else (2, 1000, 24, 1, 64, 128, 256)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    d_in = h * p
    xBC = torch.randn(b, l, d_in + 2 * g * n, device=device).to(dtype)
    proj = torch.randn(b, l, 3 + h, device=device).to(dtype)                     # dt in a wider row
    x = xBC[..., :d_in].view(b, l, h, p)
    B = xBC[..., d_in:d_in + g * n].view(b, l, g, n)
    C = xBC[..., d_in + g * n:].view(b, l, g, n)
    dt = proj[..., 3:]
    A = -(torch.rand(h, device=device) * 2.0 + 0.3)
    kw = dict(D=torch.randn(h, device=device), dt_bias=torch.randn(h, device=device) * 0.3,
              seq_idx=(torch.arange(l, device=device) >= l // 3).int()[None].expand(b, l).contiguous())
    assert not x.is_contiguous() and not dt.is_contiguous()
    views = (x, dt, A, B, C)
    copies = tuple(t.contiguous() for t in views)

    y, final, *saved = ssd_triton.forward(*views, Q, **kw)
    y_c, final_c, *saved_c = ssd_triton.forward(*copies, Q, **kw)
    assert y.is_contiguous() and torch.equal(y, y_c) and torch.equal(final, final_c)
    dy = torch.randn_like(y)
    opts = dict(D=kw["D"], z=None, dt_bias=kw["dt_bias"], initial_states=None, seq_idx=kw["seq_idx"])
    want = ssd_triton.backward(dy, None, *copies, **opts, dt_p=saved_c[0], cs=saved_c[1], prev=saved_c[2],
                               ypre=saved_c[3], chunk_size=Q)
    got = ssd_triton.backward(dy, None, *views, **opts, dt_p=saved[0], cs=saved[1], prev=saved[2],
                              ypre=saved[3], chunk_size=Q)
    for name, a, w in zip(["dx", "ddt", "dA", "dB", "dC", "dD"], got, want):
        assert torch.equal(a, w), name
    dxBC = torch.full_like(xBC, float("nan"))
    into = ssd_triton.backward(dy, None, *views, **opts, dt_p=saved[0], cs=saved[1], prev=saved[2],
                               ypre=saved[3], chunk_size=Q, out_dx=dxBC[..., :d_in].view(b, l, h, p),
                               out_dB=dxBC[..., d_in:d_in + g * n].view(b, l, g, n),
                               out_dC=dxBC[..., d_in + g * n:].view(b, l, g, n))
    assert torch.equal(dxBC, torch.cat([want[0].flatten(2), want[3].flatten(2), want[4].flatten(2)], -1))
    assert into[0].data_ptr() == dxBC.data_ptr()  # dx is the view, written in place


@interpreter_only
def test_matches_token_recurrence():
    """The kernel equals the definition (token-by-token recurrence), also across packed sequences."""
    args, kw = make_inputs(1, 45, 2, 1, 16, 16, torch.float32, "cpu", boundaries=(13, 30))
    y, final = ssd_triton.ssd_chunked(*args, chunk_size=16, return_final_states=True, **kw)
    y_n, final_n = ssd_naive(*args, return_final_states=True, **kw)
    assert rel_err(y, y_n) < 1e-5 and rel_err(final, final_n) < 1e-5


@interpreter_only
def test_final_state_only_gradient():
    """A loss on the final state alone still reaches every input (dy is zero)."""
    args, kw = make_inputs(1, 40, 2, 1, 16, 16, torch.float32, "cpu", z=False)
    leaves = [a.clone().requires_grad_() for a in args]
    leaves_r = [a.clone().requires_grad_() for a in args]
    _, f = ssd_triton.ssd_chunked(*leaves, chunk_size=16, return_final_states=True, **kw)
    _, f_r = ssd_chunked_ref(*leaves_r, chunk_size=16, return_final_states=True, **kw)
    f.square().sum().backward()
    f_r.square().sum().backward()
    for a, a_r in zip(leaves[:4], leaves_r[:4]):   # x, dt, A, B
        assert rel_err(a.grad, a_r.grad) < 1e-5
    assert leaves[4].grad.abs().max() == 0          # C never reaches the final state


def _check_step(device, b, h, g, p, n, dtype, D_kind, tol):
    state = torch.randn(b, h, p, n, device=device)
    state_r = state.clone()
    A = -(torch.rand(h, device=device) + 0.3)
    D = {"h": torch.randn(h, device=device), "hp": torch.randn(h, p, device=device), None: None}[D_kind]
    bias = torch.randn(h, device=device) * 0.3
    for _ in range(3):   # a few consecutive tokens: the state is updated in place
        x = torch.randn(b, h, p, device=device).to(dtype)
        dt = torch.randn(b, h, device=device).to(dtype)
        Bt = torch.randn(b, g, n, device=device).to(dtype)
        Ct = torch.randn(b, g, n, device=device).to(dtype)
        z = torch.randn(b, h, p, device=device).to(dtype)
        y = ssd_triton.ssd_step(state, x, dt, A, Bt, Ct, D=D, z=z, dt_bias=bias)
        y_r = ssd_step_ref(state_r, x, dt, A, Bt, Ct, D=D, z=z, dt_bias=bias)
        assert y.dtype == dtype and y.shape == (b, h, p)
        assert rel_err(y, y_r) < tol and rel_err(state, state_r) < 1e-5


@interpreter_only
@pytest.mark.parametrize("D_kind", ["h", "hp", None])
def test_step_cpu(D_kind):
    _check_step("cpu", 2, 4, 2, 16, 16, torch.float32, D_kind, 1e-5)


@interpreter_only
def test_step_continues_chunked():
    """Decoding after a prefill: chunked final state + steps == chunked over the whole sequence."""
    args, kw = make_inputs(1, 36, 2, 1, 16, 16, torch.float32, "cpu", z=False, init=False)
    x, dt, A, B, C = args
    _, state = ssd_triton.ssd_chunked(x[:, :32], dt[:, :32], A, B[:, :32], C[:, :32], chunk_size=16,
                                      return_final_states=True, **kw)
    ys = [ssd_triton.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], **kw) for t in range(32, 36)]
    y_full = ssd_chunked_ref(x, dt, A, B, C, chunk_size=16, **kw)
    assert rel_err(torch.stack(ys, 1), y_full[:, 32:]) < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU: the same checks at real shapes
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    ("mamba2_L4096", (2, 4096, 24, 1, 64, 128), 256, dict(D="h", z=False)),
    ("odd_groups_packed", (2, 3001, 8, 2, 64, 128), 256, dict(boundaries=(700, 1111, 2900))),
    ("chunk128_hp", (2, 1531, 8, 4, 64, 64), 128, dict(D="hp", boundaries=(128, 129))),
    ("chunk64", (1, 1000, 4, 1, 32, 32), 64, dict()),
    ("dt_limit", (2, 777, 8, 1, 64, 128), 256, dict(dt_limit=(0.01, 0.2))),
]


# every case in bf16 (the training dtype); fp16 and fp32 on two of them (each dtype compiles anew)
GPU_RUNS = ([(c, torch.bfloat16) for c in GPU_CASES]
            + [(GPU_CASES[i], dt) for i in (0, 1) for dt in (torch.float16, torch.float32)])


@pytest.mark.gpu
@pytest.mark.parametrize("run", GPU_RUNS, ids=[f"{c[0]}-{str(d)[6:]}" for c, d in GPU_RUNS])
def test_chunked_gpu(run):
    case, dtype = run
    _, shape, chunk, opts = case
    _run_case(shape, chunk, opts, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_step_gpu(dtype):
    _check_step("cuda", 8, 24, 1, 64, 128, dtype, "h", 2e-2 if dtype == torch.bfloat16 else 1e-5)
