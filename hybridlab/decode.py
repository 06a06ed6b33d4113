"""Decoding one token per launch: `model.step` captured once in a CUDA graph, then replayed.

At batch 1 a 190M-class model's step is hundreds of small kernels, so eager decoding is bound
by Python and launch overhead, not by the GPU. Every cache is a set of fixed tensors updated in
place (positions included), so one captured step replays correctly for every later token.
"""
from __future__ import annotations

import torch


def snapshot_caches(caches):
    """A copy of every cache tensor and position, for `restore_caches`."""
    return [({k: v.clone() for k, v in c.items()}, getattr(c, "length", None)) for c in caches]


def restore_caches(caches, snapshot):
    """Put caches back, in place, as `snapshot_caches` saw them."""
    for cache, (tensors, length) in zip(caches, snapshot):
        for key, value in tensors.items():
            cache[key].copy_(value)
        if length is not None:
            cache.length = length


class GraphedDecoder:
    """decoder(tokens (B,)) -> logits (B, V): the same as model.step(tokens, caches).

    Build it under the autocast context decoding will use, after any prefill. The returned
    logits tensor is overwritten by the next call: copy it to keep it.
    """

    def __init__(self, model, caches: list[dict], batch: int, warmup: int = 2):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.caches = caches
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        saved = snapshot_caches(caches)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():  # compile and autotune before capture
            for _ in range(warmup):
                model.step(self.tokens, caches)
        torch.cuda.current_stream().wait_stream(side)
        restore_caches(caches, saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = model.step(self.tokens, caches)
        restore_caches(caches, saved)  # capture records kernels without running them; counters moved

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for cache in self.caches:  # the Python-side length of attention caches (capacity check)
            if hasattr(cache, "advance"):
                cache.advance(1)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits
