"""Small shared helpers for tests."""
import pytest
import torch

from hybridlab.blocks import REGISTRY

# Tiny settings per block type, so every block runs in milliseconds on the CPU.
TINY = {
    "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
    "sal": {"head_dim": 8, "window": 6},
    "attention": {"head_dim": 8},
    "swa": {"head_dim": 8, "window": 5},
    "mlp": {},
}
D_MODEL = 32

# Triton kernels on CPU tensors (HYBRIDLAB_KERNELS=triton) need the interpreter, which conftest
# switches on only where there is no CUDA device; on a GPU machine the `gpu` tests cover them.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)")


def tiny_block(name, d_model=D_MODEL, n_layers=2, **overrides):
    spec = REGISTRY[name]
    cfg = spec.config_cls.from_dict({**TINY[name], **overrides}, d_model)
    return spec.module_cls(cfg, d_model, n_layers)


def open_sal_gate(block, scale=3.0):
    """Make a SAL's untrained gate select about half the tokens (its init aims at C)."""
    with torch.no_grad():
        block.gate.weight.normal_(0, scale)
        block.gate.bias.zero_()
    return block


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def grad_leaves(args):
    """args with each floating-point tensor a fresh leaf that requires grad (others as given)."""
    return [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
