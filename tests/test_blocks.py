"""Every registered block: causal, decodes step by step as its forward, counts its parameters."""
import pytest
import torch

from hybridlab.blocks import REGISTRY, Aux
from tests.helpers import D_MODEL, open_sal_gate, tiny_block

CASES = [
    ("mamba2", {}),
    ("mamba2", {"ngroups": 2, "norm_before_gate": True}),
    ("sal", {}),
    ("sal", {"kv": "selected", "positional": "rope"}),
    ("sal", {"window": None, "n_kv_heads": 2, "gate": "mlp"}),
    ("sal", {"inference": "calibrated", "kv": "selected"}),
    ("attention", {}),
    ("attention", {"n_kv_heads": 1, "positional": "none"}),
    ("swa", {}),
    ("mlp", {}),
]


def make(name, overrides):
    block = tiny_block(name, **overrides)
    if name == "sal" and overrides.get("gate", "linear") == "linear":
        open_sal_gate(block)
    return block.eval()


def test_every_registered_block_is_covered():
    assert {name for name, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize("name,overrides", CASES)
def test_param_count_matches_analytic(name, overrides):
    block = tiny_block(name, **overrides)
    assert sum(p.numel() for p in block.parameters()) == block.cfg.num_params(D_MODEL)


@pytest.mark.parametrize("name,overrides", CASES)
@pytest.mark.parametrize("training", [False, True])
def test_causal(name, overrides, training):
    block = make(name, overrides).train(training)
    L, t = 23, 11
    x = torch.randn(2, L, D_MODEL)
    x2 = x.clone()
    x2[:, t:] = torch.randn(2, L - t, D_MODEL)  # change only the future
    torch.manual_seed(1)  # same Gumbel noise for both calls
    y = block(x, Aux())
    torch.manual_seed(1)
    y2 = block(x2, Aux())
    torch.testing.assert_close(y[:, :t], y2[:, :t], atol=1e-5, rtol=1e-5)
    assert (y[:, t:] - y2[:, t:]).abs().max() > 1e-3  # and the future did change


@pytest.mark.parametrize("name,overrides", CASES)
def test_step_equals_forward(name, overrides):
    block = make(name, overrides)
    L = 19  # longer than the tiny windows (5, 6) and not a multiple of the chunk (8)
    x = torch.randn(3, L, D_MODEL)
    with torch.no_grad():
        y = block(x, Aux())
        cache = block.allocate_cache(3, L)
        ys = torch.stack([block.step(x[:, t], cache) for t in range(L)], dim=1)
    torch.testing.assert_close(ys, y, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sal", "swa"])
def test_windowed_cache_is_bounded(name):
    block = make(name, {})
    small = block.allocate_cache(1, 64)
    big = block.allocate_cache(1, 1 << 20)
    nbytes = lambda c: sum(t.numel() * t.element_size() for t in c.values())  # noqa: E731
    assert nbytes(small) == nbytes(big)
    assert block.cfg.state_bytes(D_MODEL, 8192) == block.cfg.state_bytes(D_MODEL, 1 << 20)


def test_mamba2_state_constant_and_attention_state_grows():
    m = tiny_block("mamba2")
    assert m.cfg.state_bytes(D_MODEL, 1024) == m.cfg.state_bytes(D_MODEL, 1 << 20)
    a = tiny_block("attention")
    assert a.cfg.state_bytes(D_MODEL, 2048) == 2 * a.cfg.state_bytes(D_MODEL, 1024)


@pytest.mark.parametrize("name,overrides", CASES)
def test_chunked_prefill_equals_forward(name, overrides):
    block = make(name, overrides)
    L = 25
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        y = block(x, Aux())
        cache = block.allocate_cache(2, L)
        parts, start = [], 0
        for T in (7, 1, 11, 6):  # chunks longer and shorter than the windows, one of 1 token
            parts.append(block.prefill(x[:, start:start + T], cache))
            start += T
        # and decoding continues correctly after a prefill
        cache2 = block.allocate_cache(2, L)
        block.prefill(x[:, :20], cache2)
        tail = torch.stack([block.step(x[:, t], cache2) for t in range(20, L)], dim=1)
    torch.testing.assert_close(torch.cat(parts, dim=1), y, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tail, y[:, 20:], atol=2e-5, rtol=1e-4)


def test_full_attention_cache_overflow_is_an_error():
    block = make("attention", {})
    cache = block.allocate_cache(1, 3)
    with torch.no_grad():
        block.prefill(torch.randn(1, 2, D_MODEL), cache)
        block.step(torch.randn(1, D_MODEL), cache)
        with pytest.raises(RuntimeError, match="cache of 3 tokens is full"):
            block.step(torch.randn(1, D_MODEL), cache)


def test_mamba2_out_init_std_gives_gpt2_init_of_the_residual_output():
    import math

    torch.manual_seed(0)
    default = tiny_block("mamba2", n_layers=8)
    gpt2 = tiny_block("mamba2", n_layers=8, out_init_std=0.02)
    # mamba_ssm's: Linear's default (std 1 / sqrt(3 fan_in)) shrunk by sqrt(n_layers)
    fan_in = default.out_proj.weight.shape[1]
    assert default.out_proj.weight.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in) / math.sqrt(8), rel=0.1)
    assert gpt2.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    from hybridlab.config import ConfigError
    with pytest.raises(ConfigError):
        tiny_block("mamba2", out_init_std=0.0)


@pytest.mark.parametrize("name,overrides", CASES)
def test_prefill_after_decoding_steps_continues_the_same_sequence(name, overrides):
    """prefill, a few decode steps, then another prefill: the cache's slots must still hold
    consecutive positions in the order prefill reads them (ring buffers wrap in between)."""
    block = make(name, overrides)
    L = 25
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        y = block(x, Aux())
        cache = block.allocate_cache(2, L)
        parts = [block.prefill(x[:, :7], cache)]
        parts += [block.step(x[:, t], cache)[:, None] for t in range(7, 10)]
        parts.append(block.prefill(x[:, 10:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), y, atol=2e-5, rtol=1e-4)


def test_rms_norm_writes_its_output_in_the_autocast_dtype():
    """Under autocast a pre-norm's output is in the matmuls' dtype (they would cast it anyway);
    its value is the fp32 norm rounded once, and the gradient reaching an fp32 residual stays
    fp32. Outside autocast nothing changes."""
    from hybridlab.blocks.common import RMSNorm
    from hybridlab.kernels import rms_norm_ref

    torch.manual_seed(0)
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24, requires_grad=True)
    assert norm(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, rms_norm_ref(x, norm.weight).to(torch.bfloat16), atol=0, rtol=0)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert gx.dtype == torch.float32 and gx.abs().sum() > 0
