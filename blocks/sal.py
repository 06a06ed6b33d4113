"""Selective Attention Layer (Taipan, arXiv 2410.18572, Sec. 3): see shared/taipan-spec.md.

For each token h_i coming out of the Mamba-2 stack:
  s_i = G(h_i)                               gate, Eq. 1 (RMSNorm then Linear(d, 2))
  m_i = argmax GumbelSoftmax(s_i, tau)       Eq. 2-3, straight-through; deterministic at eval
  o_i = Attention(q_i, K, V)                 Eq. 4, selected queries only, sliding window, NoPE
  h_i <- (1 - a_i) h_i + a_i o_i  if m_i     Eq. 5, [1 - a_i, a_i] = softmax(s_i)
  h   <- h + SwiGLU(RMSNorm(h))              Eq. 6
  L_constraint = (C - sum_i m_i / L)^2       Eq. 7, per sequence, mean over the batch
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SelfAttention, validate_heads
from .base import Block, BlockConfigMixin, avg_causal_context
from .common import RMSNorm, SwiGLU, init_linear, swiglu_width
from .config import Config, field
from .registry import register_block


@dataclass(frozen=True)
class SALConfig(Config, BlockConfigMixin):
    capacity: float = field(0.15, "target share C of tokens the gate selects (Eq. 7)", gt=0, le=1)
    window: Optional[int] = field(2048, "attention window in original positions (null: unbounded)",
                                  ge=1, nullable=True)
    temperature: float = field(1.0, "Gumbel-Softmax temperature tau", gt=0)
    budget_weight: float = field(1.0, "lambda, weight of the budget loss", ge=0)
    kv: str = field("all", "K/V from all tokens in the window, or from selected tokens only",
                    choices=("all", "selected"))
    positional: str = field("none", "positional encoding in the attention (paper: NoPE)",
                            choices=("none", "rope"))
    rope_theta: float = field(10000.0, "RoPE base, when positional is rope", gt=0)
    head_dim: int = field(64, "channels per attention head", ge=1)
    n_kv_heads: Optional[int] = field(None, "K/V heads for GQA (null: as many as query heads)",
                                      ge=1, nullable=True)
    gate: str = field("linear", "gate network G: Linear(d, 2), or a small MLP", choices=("linear", "mlp"))
    mlp_mult: float = field(8 / 3, "SwiGLU width = mlp_mult * d_model rounded up to 64", gt=0)

    def validate(self, d_model: int, path: str = "") -> None:
        validate_heads(d_model, self.head_dim, self.n_kv_heads, path)

    def kv_heads(self, d_model):
        return self.n_kv_heads or d_model // self.head_dim

    def _gate_params(self, d_model):
        if self.gate == "linear":
            return 2 * d_model + 2
        hidden = max(d_model // 4, 8)
        return d_model * hidden + hidden + 2 * hidden + 2

    def num_params(self, d_model: int) -> int:
        attn = d_model * (d_model + 2 * self.kv_heads(d_model) * self.head_dim) + d_model * d_model
        mlp = 3 * d_model * swiglu_width(d_model, self.mlp_mult, 64)
        return 2 * d_model + self._gate_params(d_model) + attn + mlp

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        # As implemented: projections run densely; the attention core runs for the C share of
        # queries, each over the keys in its window (a C share of them in selected-only mode).
        proj = 2 * (d_model * (d_model + 2 * self.kv_heads(d_model) * self.head_dim) + d_model * d_model)
        ctx = avg_causal_context(seq_len, self.window)
        if self.kv == "selected":
            ctx *= self.capacity
        core = self.capacity * 4 * ctx * d_model
        mlp = 6 * d_model * swiglu_width(d_model, self.mlp_mult, 64)
        return float(2 * self._gate_params(d_model) + proj + core + mlp)

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        slots = seq_len if self.window is None else min(self.window, seq_len)
        kv = 2 * slots * self.kv_heads(d_model) * self.head_dim * dtype_bytes
        return kv + slots * 8  # + the original position of each slot (int64)

    def describe(self) -> str:
        pe = "nope" if self.positional == "none" else "rope"
        return f"C={self.capacity:g} w={self.window} {pe} kv={self.kv}"


@register_block("sal", "S", SALConfig, "Taipan Selective Attention Layer: gate, sparse windowed attention, SwiGLU")
class SALBlock(Block):
    def __init__(self, cfg: SALConfig, d_model: int, n_layers: int):
        super().__init__(cfg, d_model, n_layers)
        self.norm = RMSNorm(d_model)  # shared by the gate and the attention (pre-norm)
        if cfg.gate == "linear":
            self.gate = nn.Linear(d_model, 2)
            init_linear(self.gate, 0.02)
        else:
            hidden = max(d_model // 4, 8)
            self.gate = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        # Start with P(select) = softmax(s / tau)[1] = C, so the budget loss starts near zero
        # and the first steps do not swing selection to all-or-nothing.
        last = self.gate if cfg.gate == "linear" else self.gate[-1]
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, cfg.temperature * math.log(cfg.capacity / max(1 - cfg.capacity, 1e-6))]))
        self.attn = SelfAttention(d_model, cfg.head_dim, cfg.n_kv_heads, cfg.positional,
                                  cfg.rope_theta, cfg.window, n_layers)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, swiglu_width(d_model, cfg.mlp_mult, 64))
        init_linear(self.mlp.w_gate_up, 0.02)
        init_linear(self.mlp.w_down, 0.02 / math.sqrt(2 * n_layers))

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """s (..., 2) fp32 gate logits -> m (...) in {0, 1}; straight-through while training."""
        if self.training:
            return F.gumbel_softmax(s, tau=self.cfg.temperature, hard=True)[..., 1]
        return (s[..., 1] > s[..., 0]).to(s.dtype)

    def refine(self, h, o, s, m, selected):
        """Eq. 5. Written h + m * a * (o - h) so the straight-through m carries a gradient.

        Unselected tokens have no attention output (that is the saving), so their term is
        zeroed outright: their gate learns only through the budget loss and through a.
        """
        a = torch.softmax(s, dim=-1)[..., 1]
        delta = torch.where(selected[..., None], o - h, torch.zeros_like(h))
        return h + (m * a)[..., None].to(h.dtype) * delta

    def forward(self, h, aux=None):
        u = self.norm(h)
        s = self.gate(u).float()  # (B, L, 2)
        m = self.select(s)  # (B, L)
        selected = m.detach() > 0.5
        kv_mask = selected if self.cfg.kv == "selected" else None
        o = self.attn(u, q_mask=selected, kv_mask=kv_mask)  # (B, L, d), zero rows where unselected
        h = self.refine(h, o, s, m, selected)
        if aux is not None:
            frac = m.mean(dim=1)  # (B,) selected share per sequence; carries the ST gradient
            budget = ((self.cfg.capacity - frac) ** 2).mean()
            aux.add_loss("budget_loss", self.cfg.budget_weight * budget)
            aux.add_metric("budget_loss", budget)
            aux.add_metric("selected_frac", frac.mean())
        return h + self.mlp(self.mlp_norm(h))

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        return self.attn.allocate_cache(batch, max_len, device, dtype)

    def prefill(self, h, cache):
        """A chunk (B, T, d) continuing from `cache`; deterministic selection, as in `step`."""
        u = self.norm(h)
        s = self.gate(u).float()
        selected = s[..., 1] > s[..., 0]
        write = selected if self.cfg.kv == "selected" else None
        o = self.attn.prefill(u, cache, q_mask=selected, write=write)
        h = self.refine(h, o, s, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h, cache):
        u = self.norm(h)
        s = self.gate(u).float()  # (B, 2)
        selected = s[..., 1] > s[..., 0]  # decoding is inference: deterministic selection
        write = selected if self.cfg.kv == "selected" else None
        o = self.attn.step(u, cache, write=write)
        h = self.refine(h, o, s, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))
