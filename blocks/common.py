"""Layers shared by several blocks: RMSNorm, SwiGLU, rotary embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.kernels import rms_norm
from hybridlab.kernels.dispatch import autocast_dtype

from .base import round_up


class RMSNorm(nn.Module):
    """A pre-norm. Under autocast its output is in the autocast dtype: wherever this library
    uses it (block inputs, the final norm) it feeds only projections and the LM head, which
    would cast it to that dtype anyway, so an fp32 residual stream's norm writes half the bytes
    and the cast and its backward disappear (taipan-190m: 25 norms of (B*L, 768) a step)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, autocast_dtype(x))


def swiglu_width(d_model: int, mult: float, multiple_of: int) -> int:
    """SwiGLU hidden width: mult * d_model rounded up to a multiple (8/3 * 768 -> 2048)."""
    return round_up(mult * d_model, multiple_of)


class SwiGLU(nn.Module):
    """W2 (silu(W1 x) * W3 x), no biases (Shazeer 2020; Llama).

    Init: N(0, 0.02), the output projection scaled by 1/sqrt(2 n_layers) (GPT-2), so the
    residual stream's variance does not grow with depth."""

    def __init__(self, d_model: int, hidden: int, n_layers: int):
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # [W1; W3] in one matmul
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        init_linear(self.w_gate_up, 0.02)
        init_linear(self.w_down, 0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def num_params(d_model: int, hidden: int) -> int:
        return 3 * d_model * hidden

    @staticmethod
    def flops_per_token(d_model: int, hidden: int) -> float:
        return float(6 * d_model * hidden)

    def forward(self, x):
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim // 2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    ang = positions.float()[..., None] * inv_freq
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) (the GPT-NeoX / Llama layout).

    x (..., L, H, D); cos, sin (..., L, D/2), broadcast over heads.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
