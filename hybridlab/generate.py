"""Sampling with the decoding caches: constant Mamba-2 state, window-bounded attention caches."""
from __future__ import annotations

import sys

import torch


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, on_token=None, chunk: int | None = None,
             use_cache: bool = True, cuda_graph: bool = False) -> torch.Tensor:
    """prompt (B, T) -> (B, T + max_new_tokens). `on_token(ids (B,))` streams each new token.

    use_cache=False re-runs the full forward for every token (slow; the reference that the
    cached path must equal)."""
    model.eval()
    gen = None
    if seed is not None:
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
    out = prompt
    if use_cache:
        caches = model.allocate_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = model.prefill_prompt(prompt, caches, chunk)
    else:
        logits = model(prompt).logits[:, -1]
    step = None
    if use_cache:
        def step(ids):
            return model.step(ids, caches)
        if cuda_graph and prompt.is_cuda:
            from .decode import GraphedDecoder

            step = GraphedDecoder(model, caches, prompt.shape[0])
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if i + 1 == max_new_tokens:
            break
        logits = step(nxt) if use_cache else model(out).logits[:, -1]
    return out


class TextStream:
    """Writes decoded text as tokens arrive (decoding the whole suffix keeps multi-byte
    characters and merged tokenizer pieces intact)."""

    def __init__(self, decode, stream=sys.stdout):
        self.decode, self.stream = decode, stream
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, ids: torch.Tensor) -> None:
        self.ids.append(int(ids[0]))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            return
        self.stream.write(text[len(self.printed):])
        self.stream.flush()
        self.printed = text
