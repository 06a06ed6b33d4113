"""What every block shares: the Block interface (with the hooks the core calls for every
block), the auxiliary-loss collector, and what a block records at inference."""
from __future__ import annotations

import math
from contextlib import contextmanager
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
    # (B, L) int: packed documents, each row's document ordinals (0, 0, 1, 1, 1, 2, ...,
    # non-decreasing). No block may carry state or attention across a change of id; each block
    # decides what that means for it. None: every row is one sequence.
    seq_idx: torch.Tensor | None = None

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

    Hooks the core (train, evaluate, tracking, sweep) calls for every block, so it never names a
    block type; the defaults say "nothing to add":

    hparams(configs) -> dict          classmethod: this block type's HParams columns, from the
                                      configs of its layers in an architecture; with none, neutral
                                      values (0, ""), so every run logs the same keys
    hparam_metrics: tuple[str, ...]   names among `eval_report(...).means` also logged as the
                                      HParams metric hparam/eval_<name>
    summary_metrics: dict[str, str]   aux metric name -> short label: averaged over the blocks into
                                      the training summary (NaN without such a block) and shown in
                                      the progress bar
    ablate() -> context manager | None
                                      within it the block's optional computation is off at
                                      inference (a SAL selects nothing); None: it cannot be off
    record() -> context manager yielding a Recorder | None
                                      within it each inference forward adds the block's per-token
                                      decisions (mask, score) to the Recorder; None: nothing to record
    eval_report(scope, record) -> EvalReport
                                      metrics, histograms and warnings from what the block recorded
                                      over an evaluation at layer position `scope` (a TokenRecord)
    placement: Placement | None       what placing this block type means in a sweep (the keys
                                      BLOCK.period|offset|positions): which block type its layers
                                      go after; None: a sweep cannot place it
    uses_step: bool                   whether forward reads aux.step (a step-scheduled setting);
                                      when no block does, the model passes no step, so a compiled
                                      model is not specialised on (and recompiled for) its value
    """

    hparam_metrics: tuple[str, ...] = ()
    uses_step: bool = False
    summary_metrics: dict[str, str] = {}
    placement: Placement | None = None

    def __init__(self, cfg, d_model: int, n_layers: int):
        super().__init__()
        self.cfg, self.d_model, self.n_layers = cfg, d_model, n_layers

    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        raise NotImplementedError

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def hparams(cls, configs: list) -> dict:
        return {}

    def ablate(self):
        return None

    def record(self):
        return None

    def eval_report(self, scope: str, record: "TokenRecord") -> "EvalReport":
        return EvalReport()


@dataclass(frozen=True)
class Placement:
    """What placing a block type means in a sweep (`Block.placement`): the sweep takes the type's
    layers out of the base architecture and puts one right after each chosen block of type
    `after` (its anchors, numbered 1.. in layer order), configured like the base's first layer
    of the type. `label` and `after_label` name the two types in messages ("SAL", "Mamba-2")."""

    after: str  # a registered block name
    label: str
    after_label: str


@dataclass
class Recorder:
    """What a block decided per token in the inference forwards run under `Block.record()`: one
    (mask, score) per call, mask (B, L) bool (the tokens it acted on), score (B, L) in [0, 1]
    (how strongly it leaned to act). `mark` and `score_name` name them for people (a SAL:
    "selected", "P(select)")."""

    mark: str
    score_name: str
    calls: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, mask: torch.Tensor, score: torch.Tensor) -> None:
        self.calls.append((mask.detach().bool(), score.detach().float()))


@dataclass
class TokenRecord:
    """One layer position's recorded decisions over an evaluation, batch by batch; `answers`
    holds each batch's answer positions (targets != -100) in tasks, and is None for text, where
    every position is scored."""

    mark: str
    score_name: str
    masks: list[torch.Tensor] = field(default_factory=list)  # each (B, L) bool
    scores: list[torch.Tensor] = field(default_factory=list)  # each (B, L) float
    answers: list[torch.Tensor] | None = None  # each (B, L) bool

    def share(self) -> float:
        """The share of tokens marked, per sequence, then averaged over the sequences."""
        per_seq = torch.cat([m.float().mean(dim=1) for m in self.masks])  # (N,)
        return per_seq.mean().item() if per_seq.numel() else math.nan

    def answer_share(self) -> float | None:
        """The share of answer positions marked (None without answers)."""
        if self.answers is None:
            return None
        picked = sum((m & a).sum().item() for m, a in zip(self.masks, self.answers))
        total = sum(a.sum().item() for a in self.answers)
        return picked / max(total, 1)

    def all_scores(self) -> torch.Tensor:
        """Every token's score, flat (for a histogram)."""
        return torch.cat([s.flatten() for s in self.scores]) if self.scores else torch.zeros(0)


@dataclass
class EvalReport:
    """A block's findings over an evaluation at one layer position (`Block.eval_report`)."""

    scalars: dict[str, float] = field(default_factory=dict)  # logged as blocks/<scope>/<name>
    means: dict[str, float] = field(default_factory=dict)  # val/<name>: mean over the blocks reporting it
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # blocks/<scope>/<name>
    warnings: list[str] = field(default_factory=list)  # one line each, printed at every validation


@contextmanager
def override_method(obj, name: str, wrap, value=None):
    """Within the context `obj.<name>` is `wrap(the current one)`, and `value` is yielded; on exit
    exactly what was there comes back (the class's method, or an instance override already in
    place), so overrides nest."""
    saved = obj.__dict__.get(name)
    obj.__dict__[name] = wrap(getattr(obj, name))
    try:
        yield value
    finally:
        if saved is None:
            del obj.__dict__[name]
        else:
            obj.__dict__[name] = saved


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
