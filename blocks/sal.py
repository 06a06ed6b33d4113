"""Selective Attention Layer (Taipan, arXiv 2410.18572, Sec. 3): see shared/taipan-spec.md.

For each token h_i coming out of the Mamba-2 stack:
  s_i = G(h_i)                               gate, Eq. 1 (RMSNorm then Linear(d, 2))
  m_i = argmax GumbelSoftmax(s_i, tau)       Eq. 2-3, straight-through; deterministic at eval
                                             (cfg.inference: s1 > s0, or a calibrated threshold)
  o_i = Attention(q_i, K, V)                 Eq. 4, selected queries only, sliding window, NoPE
  h_i <- (1 - a_i) h_i + a_i o_i  if m_i     Eq. 5, [1 - a_i, a_i] = softmax(s_i)
  h   <- h + SwiGLU(RMSNorm(h))              Eq. 6
  L_constraint = (C - sum_i m_i / L)^2       Eq. 7, per sequence, mean over the batch
                                             (optionally C scheduled in training: capacity_start)
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
from .config import Config, ConfigError, field, join_path
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
    gate_grad: str = field(
        "selected", "which tokens' gates learn from the LM loss. selected: attention runs only for "
        "selected queries, so an unselected token's gate learns only through the budget loss (the "
        "paper's saving); all: in training, attention also runs for unselected queries so their "
        "straight-through m gets the gradient of what selecting them would change (forward and "
        "inference unchanged; training attention cost as if C = 1)", choices=("selected", "all"))
    inference: str = field(
        "threshold", "selection at inference (eval forward, step, prefill). threshold: s1 > s0, "
        "the spec's; calibrated: p(select) above a threshold tracked in training (EMA of each "
        "batch's (1-C)-quantile), so about a share C is selected, per token and causal; topk: "
        "the top ceil(C*L) tokens of each sequence by p (non-causal: forward only)",
        choices=("threshold", "calibrated", "topk"))
    mlp_mult: float = field(8 / 3, "SwiGLU width = mlp_mult * d_model rounded up to 64", gt=0)
    capacity_start: Optional[float] = field(
        None, "capacity curriculum (not in the paper): the budget loss's target starts at this "
        "share and falls linearly to capacity over capacity_warmup_steps training steps, so the "
        "attention learns from many queries before the budget tightens; the gate starts at it "
        "too. Eval, decoding and calibration use capacity (null: no curriculum)",
        gt=0, le=1, nullable=True)
    capacity_warmup_steps: int = field(
        0, "training steps over which the budget target falls from capacity_start to capacity", ge=0)
    capacity_hold_steps: int = field(
        0, "training steps the budget target stays at capacity_start before it starts to fall "
        "(a curriculum's hold phase: the attention learns at a high share first)", ge=0)

    def validate(self, d_model: int, path: str = "") -> None:
        validate_heads(d_model, self.head_dim, self.n_kv_heads, path)
        if (self.capacity_start is None) != (self.capacity_warmup_steps == 0):
            key = "capacity_start" if self.capacity_start is None else "capacity_warmup_steps"
            raise ConfigError(join_path(path, key), "capacity_start and capacity_warmup_steps "
                              "go together: set both (a curriculum) or neither")
        if self.capacity_hold_steps and self.capacity_start is None:
            raise ConfigError(join_path(path, "capacity_hold_steps"), "a hold phase needs a "
                              "curriculum: set capacity_start and capacity_warmup_steps too")

    def capacity_at(self, step: int | None) -> float:
        """The budget target at training step `step` (None: not training, the final capacity)."""
        if self.capacity_start is None or step is None:
            return self.capacity
        t = (step - self.capacity_hold_steps) / self.capacity_warmup_steps
        if t >= 1:
            return self.capacity
        t = max(t, 0.0)
        return self.capacity_start + t * (self.capacity - self.capacity_start)

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
        sel = "" if self.inference == "threshold" else f" sel={self.inference}"
        return f"C={self.capacity:g} w={self.window} {pe} kv={self.kv}{sel}"


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
        # Start with P(select) = C, so the budget loss starts near zero and the first steps do
        # not swing selection to all-or-nothing. The hard sample argmax((s + g) / tau) is
        # argmax(s + g) for any tau, so P(select) = softmax(s)[1] (= a, Eq. 5): s1 - s0 = logit(C).
        # With a capacity curriculum, the gate starts at the curriculum's first target instead.
        last = self.gate if cfg.gate == "linear" else self.gate[-1]
        logit_c = math.log(cfg.capacity / max(1 - cfg.capacity, 1e-6))
        start = cfg.capacity_at(0)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([0.0, math.log(start / max(1 - start, 1e-6))]))
        if cfg.inference == "calibrated":
            # Threshold on the gate's logit difference s1 - s0 for inference; updated in every
            # training forward. It starts at the gate bias's s1 - s0, and is saved with the
            # weights (only in this mode, so checkpoints of the other modes are unchanged).
            self.register_buffer("select_threshold", torch.tensor(logit_c))
        self.attn = SelfAttention(d_model, cfg.head_dim, cfg.n_kv_heads, cfg.positional,
                                  cfg.rope_theta, cfg.window, n_layers)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, swiglu_width(d_model, cfg.mlp_mult, 64))
        init_linear(self.mlp.w_gate_up, 0.02)
        init_linear(self.mlp.w_down, 0.02 / math.sqrt(2 * n_layers))

    CALIBRATION_MOMENTUM = 0.99  # EMA of the per-batch quantile: a time constant of ~100 steps

    def select(self, s: torch.Tensor) -> torch.Tensor:
        """s (..., 2) fp32 gate logits -> m (...) in {0, 1}; straight-through while training."""
        if self.training:
            if self.cfg.inference == "calibrated":
                self._calibrate(s.detach())
            return F.gumbel_softmax(s, tau=self.cfg.temperature, hard=True)[..., 1]
        return self.infer_select(s).to(s.dtype)

    @torch.no_grad()
    def _calibrate(self, s: torch.Tensor) -> None:
        """Track the (1-C)-quantile of s1 - s0 over the batch's tokens (an EMA over steps), so
        `d > threshold` selects about a share C of tokens as the gate scores them in training."""
        d = (s[..., 1] - s[..., 0]).flatten()
        k = min(max(int(math.ceil((1 - self.cfg.capacity) * d.numel())), 1), d.numel())
        q = d.kthvalue(k).values
        self.select_threshold.lerp_(q.to(self.select_threshold.dtype), 1 - self.CALIBRATION_MOMENTUM)

    def infer_select(self, s: torch.Tensor) -> torch.Tensor:
        """Inference selection (cfg.inference) as bool; s (B, L, 2) or, per token, (..., 2)."""
        d = s[..., 1] - s[..., 0]
        if self.cfg.inference == "threshold":
            return d > 0
        if self.cfg.inference == "calibrated":
            return d > self.select_threshold
        # topk: the ceil(C*L) highest-scoring tokens of each sequence (needs the whole sequence)
        L = d.shape[-1]
        k = min(max(int(math.ceil(self.cfg.capacity * L)), 1), L)
        idx = d.topk(k, dim=-1).indices
        return torch.zeros_like(d, dtype=torch.bool).scatter_(-1, idx, True)

    def _causal_select(self, s: torch.Tensor) -> torch.Tensor:
        if self.cfg.inference == "topk":
            raise RuntimeError("SAL inference: topk ranks a whole sequence (non-causal), so it has "
                               "no step/prefill; use inference: calibrated or threshold to decode")
        return self.infer_select(s)

    def refine(self, h, o, s, m, selected):
        """Eq. 5. Written h + m * a * (o - h) so the straight-through m carries a gradient.

        Unselected tokens have no attention output (that is the saving), so their term is
        zeroed outright: their gate learns only through the budget loss (`selected` marks the
        rows of `o` that exist: all of them with gate_grad: all).
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
        if self.training and self.cfg.gate_grad == "all":
            # every query attends; m = 0 still leaves unselected tokens unchanged in the forward
            o = self.attn(u, kv_mask=kv_mask)
            h = self.refine(h, o, s, m, torch.ones_like(selected))
        else:
            o = self.attn(u, q_mask=selected, kv_mask=kv_mask)  # (B, L, d), zero rows where unselected
            h = self.refine(h, o, s, m, selected)
        if aux is not None:
            frac = m.mean(dim=1)  # (B,) selected share per sequence; carries the ST gradient
            target = self.cfg.capacity_at(aux.step if self.training else None)
            budget = ((target - frac) ** 2).mean()
            aux.add_loss("budget_loss", self.cfg.budget_weight * budget)
            aux.add_metric("budget_loss", budget)
            aux.add_metric("selected_frac", frac.mean())
        return h + self.mlp(self.mlp_norm(h))

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        return self.attn.allocate_cache(batch, max_len, device, dtype)

    def prefill(self, h, cache):
        """A chunk (B, T, d) continuing from `cache`; inference selection, as in `step`."""
        u = self.norm(h)
        s = self.gate(u).float()
        selected = self._causal_select(s)
        write = selected if self.cfg.kv == "selected" else None
        o = self.attn.prefill(u, cache, q_mask=selected, write=write)
        h = self.refine(h, o, s, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h, cache):
        u = self.norm(h)
        s = self.gate(u).float()  # (B, 2)
        selected = self._causal_select(s)  # decoding is inference: deterministic selection
        write = selected if self.cfg.kv == "selected" else None
        o = self.attn.step(u, cache, write=write)
        h = self.refine(h, o, s, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))
