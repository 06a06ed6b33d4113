"""Fused LM head + cross-entropy (kernels/cross_entropy_triton.py) against the plain one.

CPU: tiny shapes under TRITON_INTERPRET=1 (conftest.py); vocab not a multiple of the block,
ignored targets, several chunks. GPU: a 190M model's head (d 768, vocab 128256) in bf16.
"""
import pytest
import torch

from hybridlab.kernels import linear_cross_entropy, linear_cross_entropy_ref

cet = pytest.importorskip("hybridlab.kernels.cross_entropy_triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(n, d, V, dtype, chunk, tol, device=DEV):
    torch.manual_seed(0)
    # logits of a few units, as an LM head's: at bf16 their rounding (2**-9 relative) is what
    # separates the kernel from the fp32 reference, so large logits would only test that
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(V, d, device=device) * 2 / d ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (n,), device=device)
    t[::5] = -100  # ignored positions
    loss = cet.fused_linear_cross_entropy(h, w, t, chunk=chunk)
    h_r, w_r = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = linear_cross_entropy_ref(h_r, w_r, t)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit incoming gradient
    rh, rw = torch.autograd.grad(ref * 3.0, (h_r, w_r))
    assert gh.dtype == dtype and gw.dtype == dtype
    assert abs(loss.item() - ref.item()) < tol * abs(ref.item())
    assert rel(gh, rh) < tol and rel(gw, rw) < tol


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference_cpu(dtype):
    _check(37, 16, 300, dtype, chunk=16, tol=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")
def test_vocab_smaller_than_block():
    _check(11, 8, 50, torch.float32, chunk=8, tol=1e-5)  # lanes past V in every block


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")
def test_no_grad_and_all_ignored(monkeypatch):
    h, w = torch.randn(9, 8, requires_grad=True), torch.randn(70, 8, requires_grad=True)
    t = torch.randint(0, 70, (9,))

    def no_autograd(*args):
        raise AssertionError("evaluation under no_grad must not make gradients")

    with torch.no_grad(), monkeypatch.context() as mp:  # e.g. validation with trainable weights
        mp.setattr(cet._FusedLinearCrossEntropy, "apply", no_autograd)
        loss = cet.fused_linear_cross_entropy(h, w, t, chunk=4)
    assert torch.allclose(loss, linear_cross_entropy_ref(h, w, t), rtol=1e-5)
    t_none = torch.full((9,), -100)
    h_g = h.detach().clone().requires_grad_()
    loss = cet.fused_linear_cross_entropy(h_g, w, t_none)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h_g.grad) == 0


@pytest.mark.gpu
def test_fused_gpu_head_shape():
    _check(4099, 768, 128256, torch.bfloat16, chunk=2048, tol=2e-2, device="cuda")
    # the dispatching entry point takes the fused path on CUDA under autocast
    h = torch.randn(64, 768, device="cuda", requires_grad=True)
    w = torch.randn(1000, 768, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert rel(h.grad, torch.autograd.grad(linear_cross_entropy_ref(h, w, t), h)[0]) < 3e-2


@pytest.mark.gpu
def test_grad_w_accumulates_in_the_matmuls_fp32_epilogue():
    """The chunks' grad W sums in fp32 inside the GEMM: closer to the exact sum than a product
    rounded to bf16 and added (rel ~1e-3), and the fast path is the one that ran."""
    torch.manual_seed(0)
    acc = torch.randn(1000, 768, device="cuda")
    a = torch.randn(1000, 4099, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4099, 768, device="cuda", dtype=torch.bfloat16)
    exact = acc.double() + a.double() @ b.double()
    cet._accumulate(acc, a, b)
    assert cet._FP32_EPILOGUE, "addmm with out_dtype=float32 is missing: the slow path ran"
    assert rel(acc, exact) < 1e-5
