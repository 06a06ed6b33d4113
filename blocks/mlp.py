"""SwiGLU MLP block: x + SwiGLU(RMSNorm(x))."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import Block, BlockConfigMixin
from .common import RMSNorm, SwiGLU, swiglu_width
from hybridlab.config import Config, field
from .registry import register_block


@dataclass(frozen=True)
class MLPConfig(Config, BlockConfigMixin):
    mult: float = field(8 / 3, "hidden width = mult * d_model, rounded up to multiple_of", gt=0)
    multiple_of: int = field(64, "round the hidden width up to a multiple of this", ge=1)
    hidden: Optional[int] = field(None, "explicit hidden width (overrides mult)", ge=1, nullable=True)

    def width(self, d_model: int) -> int:
        return self.hidden or swiglu_width(d_model, self.mult, self.multiple_of)

    def num_params(self, d_model: int) -> int:
        return d_model + SwiGLU.num_params(d_model, self.width(d_model))

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        return SwiGLU.flops_per_token(d_model, self.width(d_model))

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        return 0

    def describe(self) -> str:
        return f"swiglu {self.hidden or f'{self.mult:.3g}x'}"


@register_block("mlp", "F", MLPConfig, "SwiGLU feed-forward, pre-norm residual")
class MLPBlock(Block):
    def __init__(self, cfg: MLPConfig, d_model: int, n_layers: int):
        super().__init__(cfg, d_model, n_layers)
        self.norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, cfg.width(d_model), n_layers)

    def forward(self, x, aux=None):
        return x + self.mlp(self.norm(x))

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        return {}

    def step(self, x, cache):
        return x + self.mlp(self.norm(x))

    def prefill(self, x, cache):
        return self.forward(x)
