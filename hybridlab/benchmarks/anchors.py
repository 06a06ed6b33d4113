"""The tools a researcher would use instead, built at the same size, for `hybridlab bench model`
to time beside ours in the same run (so every ratio it prints compares one machine's state):

* mamba_ssm's `MambaLMHeadModel` with Mamba-2 layers, for a graph with Mamba-2 blocks: the same
  width, state size, head dim, expansion, vocabulary and number of Mamba-2 layers (its other
  blocks left out);
* transformers' `LlamaForCausalLM` (SDPA attention), for a graph with full attention: the same
  width, heads, K/V heads, RoPE base, SwiGLU width, vocabulary and number of attention layers.

An anchor whose library is not installed is skipped with one line saying so.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..graph import Arch


@dataclass
class Anchor:
    name: str
    build: Callable[[], torch.nn.Module]  # on the CPU, fp32
    # (model, prompt (B, T)) -> caches, logits of the last token; (model, caches, token (B,)) -> logits
    prefill: Callable
    step: Callable


def _first(arch: Arch, block: str):
    return next((layer.config for layer in arch.layers if layer.block == block), None)


def _count(arch: Arch, block: str) -> int:
    return sum(layer.block == block for layer in arch.layers)


def mamba_ssm_anchor(arch: Arch) -> Anchor | str:
    cfg = _first(arch, "mamba2")
    if cfg is None:
        return "no Mamba-2 blocks"
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        from mamba_ssm.utils.generation import InferenceParams
    except ImportError as e:
        return f"mamba_ssm not importable ({e})"

    def build():
        config = MambaConfig(
            d_model=arch.d_model, n_layer=_count(arch, "mamba2"), vocab_size=arch.vocab_size,
            ssm_cfg={"layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.headdim,
                     "expand": cfg.expand, "d_conv": cfg.d_conv, "ngroups": cfg.ngroups,
                     "chunk_size": cfg.chunk_size},
            rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
            tie_embeddings=arch.tie_embeddings, pad_vocab_size_multiple=1)
        return MambaLMHeadModel(config)

    def prefill(model, idx):
        params = InferenceParams(max_seqlen=idx.shape[1] + 64, max_batch_size=idx.shape[0])
        logits = model(idx, inference_params=params, num_last_tokens=1).logits[:, -1]
        params.seqlen_offset += idx.shape[1]
        return params, logits

    def step(model, params, tok):
        logits = model(tok[:, None], inference_params=params).logits[:, -1]
        params.seqlen_offset += 1
        return logits

    return Anchor("mamba_ssm Mamba-2", build, prefill, step)


def llama_anchor(arch: Arch) -> Anchor | str:
    attn = _first(arch, "attention")
    if attn is None:
        return "no full-attention blocks"
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return f"transformers not importable ({e})"
    mlp = _first(arch, "mlp")
    width = mlp.width(arch.d_model) if mlp is not None else int(8 / 3 * arch.d_model)

    def build():
        config = LlamaConfig(
            hidden_size=arch.d_model, intermediate_size=width,
            num_hidden_layers=_count(arch, "attention"), num_attention_heads=arch.d_model // attn.head_dim,
            num_key_value_heads=attn.kv_heads(arch.d_model), head_dim=attn.head_dim,
            vocab_size=arch.vocab_size, tie_word_embeddings=arch.tie_embeddings,
            rope_theta=attn.rope_theta, rms_norm_eps=arch.norm_eps, max_position_embeddings=1 << 21)
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    def prefill(model, idx):
        out = model(idx, use_cache=True, logits_to_keep=1)
        return out.past_key_values, out.logits[:, -1]

    def step(model, cache, tok):
        # transformers 5 renamed the argument `past_key_values` to `cache`
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        return model(tok[:, None], use_cache=True, **{key: cache}).logits[:, -1]

    return Anchor("HF Llama (SDPA)", build, prefill, step)


def anchors_for(arch: Arch) -> tuple[list[Anchor], list[str]]:
    """(anchors to time, one line for each one skipped and why)."""
    found, skipped = [], []
    for make in (mamba_ssm_anchor, llama_anchor):
        a = make(arch)
        (found.append(a) if isinstance(a, Anchor) else skipped.append(f"{make.__name__[:-7]}: {a}"))
    return found, skipped


def time_anchor(anchor: Anchor, batch: int, seq_len: int, steps: int, contexts: list[int], device,
                amp, decode_steps: int = 16) -> dict:
    """Training tokens/s (the same protocol as ours: AdamW, autocast, 2 warm-up steps), then
    prefill tokens/s and eager decode ms/token at each context."""
    from .inference import _sync, is_oom
    from .model import train_throughput

    torch.manual_seed(0)
    model = anchor.build().to(device)
    vocab = model.get_input_embeddings().weight.shape[0]
    out = {"name": anchor.name, "params": sum(p.numel() for p in model.parameters())}

    def loss_fn(idx):
        logits = model(idx[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
    out["train"] = train_throughput(model, batch, seq_len, steps, device, amp, vocab=vocab, loss_fn=loss_fn)
    model.zero_grad(set_to_none=True)
    model.eval()
    rows = []
    for ctx in contexts:
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                prompt = torch.randint(0, vocab, (1, ctx), device=device)
                for _ in range(2 if device.type == "cuda" else 1):  # the first compiles/tunes
                    state = logits = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    _sync(device)
                    t0 = time.perf_counter()
                    state, logits = anchor.prefill(model, prompt)
                    _sync(device)
                    prefill_s = time.perf_counter() - t0
                tok = logits.argmax(-1)
                tok = anchor.step(model, state, tok).argmax(-1)  # warm-up
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(decode_steps):
                    tok = anchor.step(model, state, tok).argmax(-1)
                _sync(device)
            rows.append({"context": ctx, "prefill_tokens_per_s": ctx / prefill_s,
                         "decode_ms_per_token": 1e3 * (time.perf_counter() - t0) / decode_steps})
        except RuntimeError as e:
            if not is_oom(e):
                raise
            rows.append({"context": ctx, "stopped": "out of memory"})
            break
    out["decode"] = rows
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
