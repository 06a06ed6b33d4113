"""What every block shares: the Block interface and the auxiliary-loss collector."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Aux:
    """Collects auxiliary losses (already weighted, summed into the training loss) and metrics.

    Keys are prefixed with the block's tag (`layers.6.sal/budget_loss`), so the trainer can log
    each SAL separately without knowing block types.
    """

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    scope: str = "block"  # set by the model to the running layer, e.g. "layers.6.sal"
    step: int | None = None  # the optimizer step being trained (set by the trainer; None elsewhere)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        self.losses[f"{self.scope}/{name}"] = value

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        self.metrics[f"{self.scope}/{name}"] = value.detach()

    def total_loss(self) -> torch.Tensor | float:
        return sum(self.losses.values()) if self.losses else 0.0


class BlockConfigMixin:
    """Analytic figures every block config gives before anything is built."""

    def num_params(self, d_model: int) -> int:
        raise NotImplementedError

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Forward FLOPs per token averaged over a causal sequence of `seq_len` tokens."""
        raise NotImplementedError

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        """Decoding cache per sequence after `seq_len` tokens."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for the layer table."""
        return ""


class Block(nn.Module):
    """A whole residual unit: owns its pre-norm and residual rule.

    forward(x (B, L, d), aux) -> (B, L, d)
    allocate_cache(batch, max_len, device, dtype) -> dict of tensors
    step(x_t (B, d), cache) -> (B, d), advancing the cache by one token
    prefill(x (B, T, d), cache) -> (B, T, d), advancing the cache by a chunk of T tokens

    Inference (`step`, `prefill`) selects deterministically; both equal `forward` in eval mode.
    """

    def __init__(self, cfg, d_model: int, n_layers: int):
        super().__init__()
        self.cfg, self.d_model, self.n_layers = cfg, d_model, n_layers

    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        raise NotImplementedError

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        raise NotImplementedError


def avg_causal_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a query sees over positions 1..seq_len (itself included)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions < window see i keys, the rest see `window`
    head = window * (window - 1) / 2
    return (head + (seq_len - window + 1) * window) / seq_len


def round_up(x: float, multiple: int) -> int:
    # round() first so 8/3 * 768 = 2047.9999... lands on 2048, not 2112
    return math.ceil(round(x, 6) / multiple) * multiple
