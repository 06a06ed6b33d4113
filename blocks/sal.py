"""Selective Attention Layer (Taipan, arXiv 2410.18572, Sec. 3): see shared/taipan-spec.md.

For each token h_i coming out of the Mamba-2 stack:
  s_i = G(h_i)                               gate, Eq. 1 (RMSNorm then Linear(d, 2))
  m_i = argmax GumbelSoftmax(s_i, tau)       Eq. 2-3, straight-through; deterministic at eval
                                             (cfg.inference: a calibrated threshold, or s1 > s0)
  o_i = Attention(q_i, K, V)                 Eq. 4, selected queries only, sliding window, NoPE
  h_i <- (1 - a_i) h_i + a_i o_i  if m_i     Eq. 5, [1 - a_i, a_i] = softmax(s_i)
                                             (cfg.refine: residual, h_i + a_i o_i, keeps h_i)
  h   <- h + SwiGLU(RMSNorm(h))              Eq. 6
  L_constraint = (C - sum_i m_i / L)^2       Eq. 7, per sequence, mean over the batch
                                             (optionally C scheduled in training: capacity_start)

Read literally (signal: selected, refine: interpolate, inference: threshold) the gate learns to
avoid the tokens where the loss is and, at inference, selects nothing; the other settings are
ours, not the paper's, and README "SAL training" has what each did in our measurements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (AttentionShape, SelfAttention, head_dim_field, n_kv_heads_field,
                        rope_theta_field, validate_heads)
from .base import (Block, BlockConfigMixin, EvalReport, Placement, Recorder, avg_causal_context,
                   override_method)
from .common import RMSNorm, SwiGLU, init_linear, swiglu_width
from hybridlab.config import Config, ConfigError, field, join_path
from .registry import register_block


@dataclass(frozen=True)
class SALConfig(Config, BlockConfigMixin, AttentionShape):
    capacity: float = field(0.15, "target share C of tokens the gate selects (Eq. 7)", gt=0, le=1)
    window: Optional[int] = field(2048, "attention window in original positions (null: unbounded)",
                                  ge=1, nullable=True)
    temperature: float = field(1.0, "Gumbel-Softmax temperature tau", gt=0)
    budget_weight: float = field(1.0, "lambda, weight of the budget loss", ge=0)
    kv: str = field("all", "K/V from all tokens in the window, or from selected tokens only",
                    choices=("all", "selected"))
    positional: str = field("none", "positional encoding in the attention (paper: NoPE)",
                            choices=("none", "rope"))
    rope_theta: float = rope_theta_field()
    head_dim: int = head_dim_field()
    n_kv_heads: Optional[int] = n_kv_heads_field()
    gate: str = field("linear", "gate network G: Linear(d, 2), or a small MLP", choices=("linear", "mlp"))
    signal: str = field(
        "explore", "how the gate and the attention learn in training (forward at inference is the "
        "same for all). selected: the paper's literal reading, attention only for selected "
        "queries, so an unselected token's gate learns only from the budget loss and the attention "
        "never learns where it is not yet used; all (not in the paper): attention for every query, "
        "so every gate gets the straight-through gradient of what selecting its token would "
        "change (the attention still learns only at selected tokens; cost as C = 1); dense (not "
        "in the paper): as all, and the attention also learns at every unselected token the "
        "gradient it would get if that token were selected, through a detached input, so "
        "nothing leaks into the residual stream (cost as C = 1, plus a second Q/K/V projection); "
        "explore (not in the paper): a "
        "random share `explore` of the unselected tokens is selected too in training, forward "
        "included, so the attention learns and the gate's straight-through gradient measures "
        "them where the gate would not look (cost as C + explore)",
        choices=("selected", "all", "dense", "explore"))
    explore: float = field(0.1, "share of the unselected tokens that signal: explore adds to the "
                           "selection in training (not in the paper)", ge=0, le=1)
    refine: str = field(
        "residual", "how a selected token takes its attention output o. interpolate: Eq. 5, "
        "(1 - a) h + a o, which at a -> 1 replaces the Mamba-2 representation; residual (not "
        "in the paper): h + a o, which keeps it", choices=("interpolate", "residual"))
    zero_init: bool = field(
        False, "start the attention's output projection at zero (not in the paper), so that with "
        "refine: residual the SAL starts as its SwiGLU alone and selecting a token changes "
        "nothing until the attention has learned something: the gate has no early reason to avoid "
        "the tokens where the loss is")
    inference: str = field(
        "calibrated", "selection at inference (eval forward, step, prefill). calibrated (our "
        "default, not in the paper): p(select) above a threshold tracked in training (EMA of "
        "each batch's (1-C)-quantile), so about a share C is selected, per token and causal; "
        "threshold: s1 > s0, the spec's literal rule (it selects nothing while the gate sits "
        "near p = C); topk: the top ceil(C*L) tokens of each sequence by p (non-causal: "
        "forward only)", choices=("calibrated", "threshold", "topk"))
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

    @classmethod
    def from_dict(cls, data, d_model, path="", cross_check=True):
        if isinstance(data, Mapping) and "gate_grad" in data:
            # A run saved before `signal` and `refine` existed (gate_grad: selected | all, always
            # Eq. 5): read it as it was trained.
            old = {k: v for k, v in data.items() if k != "gate_grad"}
            data = {"signal": data["gate_grad"], "refine": "interpolate", **old}
        return super().from_dict(data, d_model, path, cross_check)

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

    def _gate_params(self, d_model):
        if self.gate == "linear":
            return 2 * d_model + 2
        hidden = max(d_model // 4, 8)
        return d_model * hidden + hidden + 2 * hidden + 2

    def mlp_width(self, d_model: int) -> int:
        return swiglu_width(d_model, self.mlp_mult, 64)

    def num_params(self, d_model: int) -> int:
        mlp = SwiGLU.num_params(d_model, self.mlp_width(d_model))
        return 2 * d_model + self._gate_params(d_model) + self.attn_params(d_model) + mlp

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        # As implemented: projections run densely; the attention core runs for the C share of
        # queries, each over the keys in its window (a C share of them in selected-only mode).
        ctx = avg_causal_context(seq_len, self.window)
        if self.kv == "selected":
            ctx *= self.capacity
        core = self.capacity * 4 * ctx * d_model
        mlp = SwiGLU.flops_per_token(d_model, self.mlp_width(d_model))
        return float(2 * self._gate_params(d_model) + 2 * self.attn_params(d_model) + core + mlp)

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        slots = seq_len if self.window is None else min(self.window, seq_len)
        # + the original position of each slot (int64)
        return self.kv_cache_bytes(d_model, seq_len, dtype_bytes) + slots * 8

    def describe(self) -> str:
        pe = "nope" if self.positional == "none" else "rope"
        extra = "".join(f" {k}={getattr(self, k)}" for k in ("signal", "refine", "zero_init", "inference")
                        if getattr(self, k) != SALConfig.__dataclass_fields__[k].default)
        return f"C={self.capacity:g} w={self.window} {pe} kv={self.kv}{extra}"


def documents(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents seq_idx (B, L) -> doc (B*L,), each token's document numbered across
    the batch (a document is a run of one id in a row), and n (B*L,), the tokens of each
    document number (zeros past the last one)."""
    first = torch.ones_like(seq_idx, dtype=torch.bool)
    first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    doc = first.flatten().long().cumsum(0) - 1
    n = torch.zeros_like(doc).index_add_(0, doc, torch.ones_like(doc))
    return doc, n


def sequence_shares(m: torch.Tensor, seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Share of m (B, L) per sequence, and a weight saying which entries are sequences (1) or
    padding (0): one per row, or with packed documents one per document (B*L entries, the
    first ones used), so Eq. 7 holds each document to C as if it were trained alone. Sizes
    stay fixed: no host synchronisation."""
    if seq_idx is None:
        return m.mean(dim=1), torch.ones(m.shape[0], device=m.device, dtype=m.dtype)
    doc, n = documents(seq_idx)
    sums = torch.zeros(n.shape, device=m.device, dtype=m.dtype).index_add(0, doc, m.flatten())
    return sums / n.clamp(min=1).to(m.dtype), (n > 0).to(m.dtype)


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
        if cfg.zero_init:
            nn.init.zeros_(self.attn.wo.weight)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, cfg.mlp_width(d_model), n_layers)

    # EMA of the per-batch quantile with a time constant of ~10 steps: early in training the gate
    # scores every token within a few hundredths of the others while its bias still drifts, so a
    # slower average lags by more than the spread (measured: 0.99 gave 0.46 instead of C = 0.15
    # after 150 steps of tests/test_sal_training.py; 0.9 tracks it)
    CALIBRATION_MOMENTUM = 0.9

    def select(self, s: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """s (..., 2) fp32 gate logits -> m (...) in {0, 1}; straight-through while training.
        Per token (Gumbel noise included) except inference: topk, which ranks each packed
        document (`seq_idx`) on its own."""
        if self.training:
            if self.cfg.inference == "calibrated":
                self._calibrate(s.detach())
            return F.gumbel_softmax(s, tau=self.cfg.temperature, hard=True)[..., 1]
        # seq_idx only when there is one, so rules that take s alone (overrides) still fit
        m = self.infer_select(s) if seq_idx is None else self.infer_select(s, seq_idx)
        return m.to(s.dtype)

    @torch.no_grad()
    def _calibrate(self, s: torch.Tensor) -> None:
        """Track the (1-C)-quantile of s1 - s0 over the batch's tokens (an EMA over steps), so
        `d > threshold` selects about a share C of tokens as the gate scores them in training."""
        d = (s[..., 1] - s[..., 0]).flatten()
        k = min(max(int(math.ceil((1 - self.cfg.capacity) * d.numel())), 1), d.numel())
        q = d.kthvalue(k).values
        self.select_threshold.lerp_(q.to(self.select_threshold.dtype), 1 - self.CALIBRATION_MOMENTUM)

    def infer_select(self, s: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Inference selection (cfg.inference) as bool; s (B, L, 2) or, per token, (..., 2).
        `seq_idx` (B, L): packed documents, each ranked on its own by topk."""
        d = s[..., 1] - s[..., 0]
        if self.cfg.inference == "threshold":
            return d > 0
        if self.cfg.inference == "calibrated":
            return d > self.select_threshold
        if seq_idx is not None:
            return self._topk_per_document(d, seq_idx)
        # topk: the ceil(C*L) highest-scoring tokens of each sequence (needs the whole sequence)
        L = d.shape[-1]
        k = min(max(int(math.ceil(self.cfg.capacity * L)), 1), L)
        idx = d.topk(k, dim=-1).indices
        return torch.zeros_like(d, dtype=torch.bool).scatter_(-1, idx, True)

    def _topk_per_document(self, d: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
        """topk with packed documents: the ceil(C*n) highest-scoring tokens of each document of
        n tokens, as if each were its own sequence. d (B, L) -> (B, L) bool."""
        doc, n = documents(seq_idx)
        order = d.flatten().argsort(descending=True, stable=True)  # (B*L,) best first
        order = order[doc[order].argsort(stable=True)]  # grouped by document, best first in each
        first = n.cumsum(0) - n  # each document's first slot in `order`
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=d.device) - first[doc[order]]
        k = torch.ceil(self.cfg.capacity * n.double()).long().clamp(min=1)  # as in infer_select
        return (rank < k[doc]).view_as(d)

    def _causal_select(self, s: torch.Tensor) -> torch.Tensor:
        if self.cfg.inference == "topk":
            raise RuntimeError("SAL inference: topk ranks a whole sequence (non-causal), so it has "
                               "no step/prefill; use inference: calibrated or threshold to decode")
        return self.infer_select(s)

    def refine(self, h, o, a, m, rows):
        """Eq. 5 (or its residual form, cfg.refine) for the tokens where m = 1.

        Written h + m * a * delta so the straight-through m carries a gradient: what taking o
        would change, d loss / d m = a <g, delta>. `rows` (B, L) bool marks the rows of `o` that
        exist; elsewhere delta is zero (no attention ran there: that is the saving).
        """
        delta = o - h if self.cfg.refine == "interpolate" else o
        delta = torch.where(rows[..., None], delta, torch.zeros_like(delta))
        return h + (m * a)[..., None].to(h.dtype) * delta

    def _attend(self, u, q_mask, selected, seq_idx=None):
        """Attention output (B, L, d) for the queries in q_mask (None: all), zero rows elsewhere;
        K/V from the `selected` tokens only in kv: selected mode; within each packed document
        (`seq_idx`) only. The window stays in the row's positions: inside one document they
        differ by the same amounts as alone."""
        kv_mask = selected if self.cfg.kv == "selected" else None
        return self.attn(u, q_mask=q_mask, kv_mask=kv_mask, seq_idx=seq_idx)

    def _train_mix(self, h, u, a, m, seq_idx=None):
        """The refined h in training, by cfg.signal (see the field's help); m (B, L) is the
        gate's straight-through selection (the budget loss counts it, not the explored tokens).
        Every signal is per token, so with packed documents only the attention needs seq_idx."""
        selected = m.detach() > 0.5
        signal = self.cfg.signal
        if signal == "explore":
            extra = (torch.rand_like(a) < self.cfg.explore) & ~selected
            # forced in, forward included; m + (1 - sg(m)) keeps the gate's ST gradient there
            m = torch.where(extra, m + (1 - m.detach()), m)
            selected = selected | extra
        if signal in ("selected", "explore"):
            return self.refine(h, self._attend(u, selected, selected, seq_idx), a, m, selected)
        everyone = torch.ones_like(selected)
        if signal == "all":  # m = 0 keeps the unselected rows out of the forward
            return self.refine(h, self._attend(u, None, selected, seq_idx), a, m, everyone)
        # dense: the selected queries as in `selected`; the others through a detached input, so
        # their attention output reaches neither the forward (m = 0) nor the residual stream's
        # gradient, and trains only the attention's weights, as if selected
        o = self._attend(u, selected, selected, seq_idx)
        o_unsel = self._attend(u.detach(), ~selected, selected, seq_idx)
        y = self.refine(h, o + o_unsel.detach(), a, m, everyone)  # gate: ST at every token
        weight = (a.detach() * (~selected))[..., None].to(h.dtype)  # d y / d o had it been picked
        return y + weight * (o_unsel - o_unsel.detach())

    def forward(self, h, aux=None):
        seq_idx = aux.seq_idx if aux is not None else None  # packed documents (B, L) or None
        u = self.norm(h)
        s = self.gate(u).float()  # (B, L, 2), Eq. 1
        a = torch.softmax(s, dim=-1)[..., 1]  # P(select), the mix weight of Eq. 5
        # (B, L) hard 0/1, Eq. 2-3; seq_idx only when packed, so overrides of s alone still fit
        m = self.select(s) if seq_idx is None else self.select(s, seq_idx)
        if self.training:
            h = self._train_mix(h, u, a, m, seq_idx)
        else:
            selected = m > 0.5
            h = self.refine(h, self._attend(u, selected, selected, seq_idx), a, m, selected)
        if aux is not None:
            # the gate's own share per sequence (a packed document is one); carries the ST gradient
            frac, real = sequence_shares(m, seq_idx)
            target = self.cfg.capacity_at(aux.step if self.training else None)
            budget = (real * (target - frac) ** 2).sum() / real.sum()  # mean over the sequences
            aux.add_loss("budget_loss", self.cfg.budget_weight * budget)
            aux.add_metric("budget_loss", budget)
            aux.add_metric("selected_frac", (real * frac).sum() / real.sum())
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
        a = torch.softmax(s, dim=-1)[..., 1]
        h = self.refine(h, o, a, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))

    def step(self, h, cache):
        u = self.norm(h)
        s = self.gate(u).float()  # (B, 2)
        selected = self._causal_select(s)  # decoding is inference: deterministic selection
        write = selected if self.cfg.kv == "selected" else None
        o = self.attn.step(u, cache, write=write)
        a = torch.softmax(s, dim=-1)[..., 1]
        h = self.refine(h, o, a, selected.float(), selected)
        return h + self.mlp(self.mlp_norm(h))

    # ------------------------------------------------------------------ diagnostics hooks
    # The core calls these for every block (blocks/base.py, Block) and never names the SAL.

    summary_metrics = {"selected_frac": "sel"}  # the training share: run summary, progress bar
    hparam_metrics = ("selected_frac",)  # the inference share: HParams metric hparam/eval_selected_frac

    @classmethod
    def hparams(cls, configs):
        """HParams columns from the first SAL (neutral values without one); n_sal counts them."""
        c = configs[0] if configs else None
        return {
            "n_sal": len(configs),
            "sal_capacity": c.capacity if c else 0.0,
            "sal_window": (c.window or 0) if c else 0,
            "sal_kv": c.kv if c else "",
            "sal_positional": c.positional if c else "",
            "sal_temperature": c.temperature if c else 0.0,
            "sal_inference": c.inference if c else "",
            "sal_budget_weight": c.budget_weight if c else 0.0,
            "sal_signal": c.signal if c else "",
            "sal_refine": c.refine if c else "",
            "sal_zero_init": c.zero_init if c else False,
        }

    def ablate(self):
        """Select no token at inference: the attention adds nothing, the SwiGLU still runs."""
        def nothing(rule):
            return lambda s, seq_idx=None: torch.zeros(s.shape[:-1], dtype=torch.bool, device=s.device)
        return override_method(self, "infer_select", nothing)

    def record(self):
        """Record each inference selection (B, L) and P(select) = softmax(s)[..., 1] (B, L),
        whatever rule makes the selection (the configured one, or an override such as ablate's)."""
        recorder = Recorder("selected", "P(select)")

        def recorded(rule):
            def select(s, seq_idx=None):
                m = rule(s) if seq_idx is None else rule(s, seq_idx)
                recorder.add(m, torch.softmax(s.float(), dim=-1)[..., 1])
                return m
            return select
        return override_method(self, "infer_select", recorded, recorder)

    def eval_report(self, scope, record):
        """The inference share (and, in tasks, the share of answer positions selected), the
        P(select) histogram, and a warning when the share is far from the capacity C: below C/3
        the SAL is as good as off, above 3C it spends far more than it was trained to."""
        share, capacity = record.share(), self.cfg.capacity
        report = EvalReport(scalars={"eval_selected_frac": share}, means={"selected_frac": share},
                            histograms={"p_select": record.all_scores()})
        answers = record.answer_share()
        if answers is not None:
            report.scalars["eval_answer_selected_frac"] = answers
            report.means["answer_selected_frac"] = answers
        head = f"SAL {scope} selects {share:.3f} at inference (capacity {capacity:g})"
        if share < capacity / 3:
            off = "it is off" if share == 0 else "far below its capacity, nearly off"
            report.warnings.append(f"{head}: {off}")
        elif share > 3 * capacity:
            report.warnings.append(f"{head}: far above its capacity")
        return report

    # Taipan puts a SAL after Mamba-2 blocks (Sec. 3: one after every six); a sweep's sal.period,
    # sal.offset and sal.positions choose which of the base's Mamba-2 blocks get one.
    placement = Placement(after="mamba2", label="SAL", after_label="Mamba-2")

    @property
    def uses_step(self) -> bool:  # the budget target's schedule (capacity_start)
        return self.cfg.capacity_start is not None
