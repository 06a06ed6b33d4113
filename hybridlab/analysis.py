"""Analytic figures of an architecture, computed from configs alone (nothing is built)."""
from __future__ import annotations

from collections import OrderedDict

from .graph import Arch


def params_by_block(arch: Arch) -> "OrderedDict[str, int]":
    """Parameters per block type, plus the embedding (and untied head) and final norm.

    Shared layers count once, as in `HybridLM.num_params`."""
    d = arch.d_model
    out: OrderedDict[str, int] = OrderedDict()
    out["embedding"] = arch.vocab_size * d
    for layer in arch.layers:
        if layer.share is None:
            out[layer.block] = out.get(layer.block, 0) + layer.config.num_params(d)
    if not arch.tie_embeddings:
        out["head"] = arch.vocab_size * d
    out["final_norm"] = d
    return out


def num_params(arch: Arch) -> int:
    return sum(params_by_block(arch).values())


def flops_per_token(arch: Arch, seq_len: int) -> float:
    """Forward FLOPs per token (matmuls as 2*m*n*k), averaged over a causal sequence, head included."""
    d = arch.d_model
    blocks = sum(layer.config.flops_per_token(d, seq_len) for layer in arch.layers)
    return blocks + 2 * d * arch.vocab_size


def state_bytes(arch: Arch, seq_len: int, dtype_bytes: int = 2) -> int:
    """Decoding cache per sequence after `seq_len` tokens."""
    return sum(layer.config.state_bytes(arch.d_model, seq_len, dtype_bytes) for layer in arch.layers)


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"
