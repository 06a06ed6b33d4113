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
        self.uses_step = any(block.uses_step for block in blocks)
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
                return_logits: bool = True, step: int | None = None,
                seq_idx: torch.Tensor | None = None) -> LMOutput:
        """idx (B, L) token ids; targets (B, L) next tokens, -100 to ignore; `step`: the training
        step, passed to the blocks through Aux for step-scheduled settings (None: their end value).
        `seq_idx` (B, L) int: documents packed in a row, numbered 0, 1, ... (non-decreasing);
        passed to the blocks through Aux, so no state or attention crosses a document boundary
        and each document's logits are those it would get alone. None: one sequence per row.

        With targets and return_logits=False (training), the head and the loss run chunk by
        chunk and the (B, L, vocab) logits are never materialised (kernels/cross_entropy.py).
        """
        # the step only where a block schedules by it: torch.compile guards on the int it reads
        aux = Aux(step=step if self.uses_step else None, seq_idx=seq_idx)
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
        (B, T, V) with `all_logits`. One pass: see `prefill_chunk` for prompts too long for it."""
        h = self.embed(idx)
        for block, cache in zip(self.layers, caches):
            h = block.prefill(h, cache)
        return self.logits(h if all_logits else h[:, -1])

    def prefill_prompt(self, idx: torch.Tensor, caches: list[dict], chunk: int | None = None) -> torch.Tensor:
        """A whole prompt idx (B, T) in passes of `chunk` tokens (None: `prefill_chunk`) ->
        logits (B, V) of its last token."""
        chunk = chunk or self.prefill_chunk(idx.shape[0], idx.shape[1])
        for s in range(0, idx.shape[1], chunk):
            logits = self.prefill(idx[:, s:s + chunk], caches)
        return logits

    # Activation bytes one prompt token may hold at once during a prefill, per unit of d_model:
    # a bf16 Mamba-2 in-projection output (~4.4 d), its conv output and the SSD's fp32 output
    # and states (~8 d), attention q/k/v and output (~4 d), the residual stream, with a 2x margin.
    PREFILL_BYTES_PER_TOKEN_PER_DIM = 64

    def prefill_chunk(self, batch: int, length: int) -> int:
        """Tokens per prefill pass: the whole prompt when its activations fit in half of the free
        device memory (kernels carry the state across passes, so longer prompts go in the fewest
        passes that fit); 4096 on the CPU, whose reference attention is quadratic in memory."""
        device = self.embed.weight.device
        if device.type != "cuda":
            return min(length, 4096)
        free, _ = torch.cuda.mem_get_info(device)
        per_token = self.PREFILL_BYTES_PER_TOKEN_PER_DIM * self.arch.d_model * batch
        fits = max(1024, int(free // 2 // per_token) // 1024 * 1024)
        passes = -(-length // fits)
        return -(-length // passes)

    def step(self, idx: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """idx (B,) the next token of each sequence -> logits (B, V); advances the caches."""
        h = self.embed(idx)  # (B, d)
        for block, cache in zip(self.layers, caches):
            h = block.step(h, cache)
        return self.logits(h)


def cache_bytes(caches: list[dict]) -> int:
    return sum(t.numel() * t.element_size() for c in caches for t in c.values())
