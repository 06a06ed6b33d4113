"""pytest-benchmark cases for the kernels at the paper's shapes (CUDA only; skipped elsewhere).

    python -m pytest tests/test_benchmarks.py --benchmark-enable

The `hybridlab bench kernels|attention` commands print the same cases as tables with ratios
against baselines run in the same call; these give pytest-benchmark's statistics and history.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu


def _sync_call(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


@pytest.fixture
def ssd_inputs():
    b, l, h, p, n = 8, 8192, 24, 64, 128
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(b, l, h, p, device=dev, dtype=dt, requires_grad=True)
    dtr = (torch.randn(b, l, h, device=dev) * 0.5 - 1).to(dt).requires_grad_()
    A = -(torch.rand(h, device=dev) * 2 + 0.3)
    B = torch.randn(b, l, 1, n, device=dev, dtype=dt, requires_grad=True)
    C = torch.randn(b, l, 1, n, device=dev, dtype=dt, requires_grad=True)
    return x, dtr, A, B, C


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_bench_ssd_b8_l8192(benchmark, ssd_inputs, backward):
    from hybridlab.kernels import ssd_triton

    x, dt, A, B, C = ssd_inputs

    def fn():
        y = ssd_triton.ssd_chunked(x, dt, A, B, C, chunk_size=256)
        if backward:
            y.sum().backward()
        return y

    benchmark(_sync_call(fn))


@pytest.mark.parametrize("capacity", [0.15, 1.0])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_bench_selective_attention_b4_l16384(benchmark, capacity, backward):
    from hybridlab.kernels import selective_attention_triton

    b, L, h, d = 4, 16384, 12, 64
    q, k, v = (torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.rand(b, L, device="cuda") < capacity

    def fn():
        o = selective_attention_triton.selective_attention(q, k, v, q_mask=mask, window=2048)
        if backward:
            o.sum().backward()
        return o

    benchmark(_sync_call(fn))
