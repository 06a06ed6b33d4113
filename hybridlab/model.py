"""HybridLM: embedding -> registered blocks -> final RMSNorm -> (tied) LM head."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybridlab.blocks import REGISTRY, Aux
from hybridlab.blocks.common import RMSNorm
from hybridlab.kernels import linear_cross_entropy

from .graph import Arch


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, L, V); None when training with return_logits=False
    loss: torch.Tensor | None = None  # ce_loss + aux_loss, what the optimiser minimises
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | float = 0.0
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class HybridLM(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        d, n = arch.d_model, len(arch.layers)
        self.embed = nn.Embedding(arch.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=arch.init_std)
        named: dict[str, nn.Module] = {}
        blocks = []
        for layer in arch.layers:
            if layer.share is not None:
                blocks.append(named[layer.share])  # the same module object: weights shared
                continue
            block = REGISTRY[layer.block].module_cls(layer.config, d, n)
            if layer.name is not None:
                named[layer.name] = block
            blocks.append(block)
        self.layers = nn.ModuleList(blocks)
        self.scopes = [f"layers.{i}.{layer.block}" for i, layer in enumerate(arch.layers)]
        self.norm_f = RMSNorm(d, arch.norm_eps)
        self.head = None
        if not arch.tie_embeddings:
            self.head = nn.Linear(d, arch.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=arch.init_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts shared ones once

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm_f(h), self.head_weight())

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_logits: bool = True, step: int | None = None) -> LMOutput:
        """idx (B, L) token ids; targets (B, L) next tokens, -100 to ignore; `step`: the training
        step, passed to the blocks through Aux for step-scheduled settings (None: their end value).

        With targets and return_logits=False (training), the head and the loss run chunk by
        chunk and the (B, L, vocab) logits are never materialised (kernels/cross_entropy.py).
        """
        aux = Aux(step=step)
        h = self.embed(idx)  # (B, L, d)
        for scope, block in zip(self.scopes, self.layers):
            aux.scope = scope
            h = block(h, aux)
        out = LMOutput(logits=None, aux_loss=aux.total_loss(), metrics=aux.metrics)
        if return_logits or targets is None:
            out.logits = self.logits(h)
        if targets is not None:
            if out.logits is not None:
                out.ce_loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            else:
                hn = self.norm_f(h)
                out.ce_loss = linear_cross_entropy(hn.flatten(0, 1), self.head_weight(), targets.flatten())
            out.loss = out.ce_loss + out.aux_loss
        return out

    @torch.no_grad()
    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list[dict]:
        """One cache per layer position (a shared block still needs its own cache)."""
        device = device or self.embed.weight.device
        return [block.allocate_cache(batch, max_len, device, dtype) for block in self.layers]

    def prefill(self, idx: torch.Tensor, caches: list[dict], all_logits: bool = False) -> torch.Tensor:
        """idx (B, T) continuing the cached sequences -> logits (B, V) of the last token, or
        (B, T, V) with `all_logits`. Long prompts go in chunks: memory stays bounded."""
        h = self.embed(idx)
        for block, cache in zip(self.layers, caches):
            h = block.prefill(h, cache)
        return self.logits(h if all_logits else h[:, -1])

    def step(self, idx: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """idx (B,) the next token of each sequence -> logits (B, V); advances the caches."""
        h = self.embed(idx)  # (B, d)
        for block, cache in zip(self.layers, caches):
            h = block.step(h, cache)
        return self.logits(h)


def cache_bytes(caches: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for c in caches for t in c.values())
