"""Causal self-attention (full or sliding-window), and the `attention` and `swa` blocks.

`SelfAttention` is shared with the SAL: q/k/v projections, optional RoPE, GQA, and a decode
cache that is a ring buffer when a window bounds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hybridlab.kernels import attention_by_position, selective_attention, selective_attention_decode

from .base import Block, BlockConfigMixin, avg_causal_context
from .common import RMSNorm, apply_rope, init_linear, rope_angles
from hybridlab.config import Config, ConfigError, field, join_path
from .registry import register_block


class KVCache(dict):
    """K/V slots plus positions (tensors), and the number of tokens seen as a Python int, so the
    capacity check of a full-attention cache needs no device sync in the decoding loop."""

    length = 0
    window: int | None = None
    # Every token so far was cached (no `write` mask): slots then hold consecutive positions,
    # which lets prefill run the training kernel over [cached tokens; chunk] (see prefill).
    all_kept = True

    def advance(self, n: int, window: int | None = None) -> None:
        window = self.window if window is None else window
        if window is None and self.length + n > self["k"].shape[1]:
            raise RuntimeError(f"attention cache of {self['k'].shape[1]} tokens is full: "
                               "allocate_cache with a larger max_len")
        self.length += n


def validate_heads(d_model: int, head_dim: int, n_kv_heads: int | None, path: str) -> None:
    """Heads must tile d_model, and K/V heads must divide the query heads (GQA)."""
    if d_model % head_dim:
        raise ConfigError(join_path(path, "head_dim"), f"d_model {d_model} is not divisible by head_dim {head_dim}")
    n_heads = d_model // head_dim
    if n_kv_heads is not None and n_heads % n_kv_heads:
        raise ConfigError(join_path(path, "n_kv_heads"),
                          f"{n_heads} query heads are not divisible by n_kv_heads {n_kv_heads}")


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, head_dim: int, n_kv_heads: int | None, positional: str,
                 rope_theta: float, window: int | None, n_layers: int, rope_scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.window = head_dim, window
        self.n_heads = d_model // head_dim
        self.n_kv_heads = n_kv_heads or self.n_heads
        self.positional, self.rope_theta, self.rope_scaling = positional, rope_theta, rope_scaling
        self.wqkv = nn.Linear(d_model, (self.n_heads + 2 * self.n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * head_dim, d_model, bias=False)
        init_linear(self.wqkv, 0.02)
        init_linear(self.wo, 0.02 / math.sqrt(2 * n_layers))

    def _qkv(self, x, positions):
        """x (..., L, d) -> q (..., L, H, D), k, v (..., L, Hkv, D), RoPE applied if enabled."""
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
             self.n_kv_heads * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.positional == "rope":
            if self.rope_scaling is None:
                cos, sin = rope_angles(positions, self.head_dim, self.rope_theta)
            else:
                cos, sin = llama3_rope_angles(positions, self.head_dim, self.rope_theta, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x, q_mask=None, kv_mask=None, seq_idx=None):
        """x (B, L, d) -> (B, L, d). Rows of queries outside q_mask are zero before `wo`.
        `seq_idx` (B, L): packed documents; a query sees keys of its own document only.
        RoPE keeps the row's positions: a document's scores depend only on positions within
        it (q_i . k_j rotates by i - j), so packed or alone they are the same."""
        b, L, _ = x.shape
        q, k, v = self._qkv(x, torch.arange(L, device=x.device))
        o = selective_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=self.window,
                                seq_idx=seq_idx)
        return self.wo(o.flatten(-2))

    def cache_slots(self, max_len: int) -> int:
        return max_len if self.window is None else min(self.window, max_len)

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        slots = self.cache_slots(max_len)
        dtype = dtype or self.wqkv.weight.dtype
        shape = (batch, slots, self.n_kv_heads, self.head_dim)
        cache = KVCache({
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "slot_pos": torch.full((batch, slots), -1, device=device, dtype=torch.long),
            "pos": torch.zeros(batch, device=device, dtype=torch.long),  # tokens seen
            "written": torch.zeros(batch, device=device, dtype=torch.long),  # tokens cached
        })
        cache.window = self.window
        return cache

    def prefill(self, x, cache, q_mask=None, write=None):
        """Continue from `cache` with a chunk x (B, T, d) -> (B, T, d); appends the chunk's K/V.

        `q_mask` (B, T): queries that attend (others output zeros); `write` (B, T): tokens whose
        K/V enter the cache and are visible as keys (None: all). Same result as `forward` over
        the whole sequence, computed chunk by chunk with memory bounded by the cache.
        """
        if write is None and cache.all_kept:
            return self._prefill_consecutive(x, cache, q_mask)
        cache.all_kept = False
        b, T, _ = x.shape
        # Slots that can hold anything yet: a full-attention cache fills from slot 0, so only
        # its first `length` slots are read (prefill cost grows with the context, not max_len).
        S = cache["k"].shape[1] if self.window is not None else min(cache.length, cache["k"].shape[1])
        cache.advance(T, self.window)
        positions = cache["pos"][:, None] + torch.arange(T, device=x.device)  # (B, T)
        q, k, v = self._qkv(x, positions)
        keep = torch.ones(b, T, dtype=torch.bool, device=x.device) if write is None else write
        k_all = torch.cat([cache["k"][:, :S].to(k.dtype), k], dim=1)  # (B, S + T, Hkv, D)
        v_all = torch.cat([cache["v"][:, :S].to(v.dtype), v], dim=1)
        slot_pos = cache["slot_pos"][:, :S]
        k_pos = torch.cat([slot_pos, positions], dim=1)
        k_valid = torch.cat([slot_pos >= 0, keep], dim=1)[:, None, :].repeat(1, T, 1)
        # a query always sees itself, also when its K/V is not cached (selected-only mode)
        k_valid[:, :, S:] |= torch.eye(T, dtype=torch.bool, device=x.device)
        o = attention_by_position(q, k_all, v_all, positions, k_pos, k_valid, self.window)
        if q_mask is not None:
            o = o * q_mask[:, :, None, None].to(o.dtype)
        self._append(cache, k, v, positions, keep)
        cache["pos"] += T
        return self.wo(o.flatten(-2))

    def _prefill_consecutive(self, x, cache, q_mask):
        """Prefill when every earlier token is cached: the cached slots, put in position order,
        and the chunk form one consecutive stretch of positions, so the training kernel (causal,
        windowed, compacted queries) runs over [cache; chunk] with only the chunk's queries
        selected. No (T, S + T) mask and no host sync: a 128K-token prompt goes in one pass."""
        b, T, _ = x.shape
        S, seen = cache["k"].shape[1], cache.length
        n = min(seen, S)  # cached tokens: positions seen - n .. seen - 1
        cache.advance(T, self.window)
        positions = seen + torch.arange(T, device=x.device)
        q, k, v = self._qkv(x, positions)
        qm = torch.ones(b, T, dtype=torch.bool, device=x.device) if q_mask is None else q_mask
        if n:
            order = (seen - n + torch.arange(n, device=x.device)) % S  # slots, oldest first
            k = torch.cat([cache["k"][:, order].to(k.dtype), k], dim=1)  # (B, n + T, Hkv, D)
            v = torch.cat([cache["v"][:, order].to(v.dtype), v], dim=1)
            q = torch.cat([q.new_zeros(b, n, *q.shape[2:]), q], dim=1)
            qm = torch.cat([qm.new_zeros(b, n), qm], dim=1)
        dense = n == 0 and q_mask is None
        o = selective_attention(q, k, v, q_mask=None if dense else qm, window=self.window)[:, n:]
        # the chunk's newest min(T, S) tokens go to the slots after the last one written
        keep = min(T, S)
        slots = (seen + T - keep + torch.arange(keep, device=x.device)) % S
        cache["k"][:, slots] = k[:, -keep:].to(cache["k"].dtype)
        cache["v"][:, slots] = v[:, -keep:].to(cache["v"].dtype)
        cache["slot_pos"][:, slots] = positions[-keep:]
        cache["written"] += T
        cache["pos"] += T
        return self.wo(o.flatten(-2))

    def _append(self, cache, k, v, positions, keep):
        """Write a chunk's kept tokens into the cache; a ring (windowed) keeps the newest S."""
        S = cache["k"].shape[1]
        for row in range(k.shape[0]):  # rows keep different tokens in selected-only mode
            idx = keep[row].nonzero().squeeze(1)
            written, n = int(cache["written"][row]), idx.numel()
            idx = idx[max(0, n - S):]  # older ones would be overwritten within this chunk
            ordinal = written + n - idx.numel() + torch.arange(idx.numel(), device=k.device)
            cache["k"][row, ordinal % S] = k[row, idx].to(cache["k"].dtype)
            cache["v"][row, ordinal % S] = v[row, idx].to(cache["v"].dtype)
            cache["slot_pos"][row, ordinal % S] = positions[row, idx]
            cache["written"][row] += n

    def step(self, x, cache, write=None):
        """x (B, d) -> (B, d) for the next token. `write` (B,) bool: cache this token's K/V
        (None: every token). A bounded cache is a ring: slot = written % slots."""
        b = x.shape[0]
        if write is not None:
            cache.all_kept = False
        pos = cache["pos"]
        q, k, v = self._qkv(x[:, None], pos[:, None])  # (B, 1, H, D)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        k, v = k.to(cache["k"].dtype), v.to(cache["v"].dtype)  # autocast may compute in bf16
        slots = cache["k"].shape[1]
        slot = cache["written"] % slots
        cache.advance(1, self.window)
        keep = torch.ones(b, dtype=torch.bool, device=x.device) if write is None else write
        rows = torch.arange(b, device=x.device)
        kk = keep[:, None, None]
        cache["k"][rows, slot] = torch.where(kk, k, cache["k"][rows, slot])
        cache["v"][rows, slot] = torch.where(kk, v, cache["v"][rows, slot])
        cache["slot_pos"][rows, slot] = torch.where(keep, pos, cache["slot_pos"][rows, slot])
        cache["written"] += keep.long()
        o = selective_attention_decode(q, cache["k"], cache["v"], cache["slot_pos"], pos,
                                       window=self.window)
        cache["pos"] += 1
        return self.wo(o.flatten(-2))


# The settings of a `SelfAttention`, for every config that builds one (attention, swa, sal).
def head_dim_field():
    return field(64, "channels per attention head; heads = d_model / head_dim", ge=1)


def n_kv_heads_field():
    return field(None, "K/V heads for GQA (null: as many as query heads)", ge=1, nullable=True)


def rope_theta_field():
    return field(10000.0, "RoPE base, when positional is rope", gt=0)


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def validate_rope_scaling(scaling, path: str) -> None:
    """`rope_scaling` is null or {type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}, every number > 0 and high_freq_factor > low_freq_factor."""
    if scaling is None:
        return
    path = join_path(path, "rope_scaling")
    if not isinstance(scaling, dict):
        raise ConfigError(path, f"must be a mapping like {{type: llama3, factor: 8, ...}}, got {scaling!r}")
    if scaling.get("type") != "llama3":
        raise ConfigError(join_path(path, "type"), f"must be llama3 (the only scaling supported), "
                                                   f"got {scaling.get('type')!r}")
    for key in scaling:
        if key != "type" and key not in LLAMA3_SCALING_KEYS:
            raise ConfigError(join_path(path, str(key)), f"unknown key; known: type, {', '.join(LLAMA3_SCALING_KEYS)}")
    for key in LLAMA3_SCALING_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(join_path(path, key), f"must be a number > 0, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(join_path(path, "high_freq_factor"), "must be > low_freq_factor")


def llama3_rope_angles(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict):
    """`rope_angles` with Llama 3.1's frequency scaling: wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched `factor` times, those shorter
    than original_max_position_embeddings / high_freq_factor are kept, and the band between
    blends the two linearly in original_max_position_embeddings / wavelength."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    # 0 at the long-wavelength edge (all scaled), 1 at the short one (unchanged)
    smooth = ((scaling["original_max_position_embeddings"] / wavelen - low) / (high - low)).clamp(0, 1)
    inv_freq = (1 - smooth) * inv_freq / scaling["factor"] + smooth * inv_freq
    ang = positions.float()[..., None] * inv_freq
    return ang.cos(), ang.sin()


class AttentionShape:
    """Parameter count, projection FLOPs and cache size of a `SelfAttention`, from a config's
    head_dim, n_kv_heads and window."""

    def kv_heads(self, d_model: int) -> int:
        return self.n_kv_heads or d_model // self.head_dim

    def attn_params(self, d_model: int) -> int:
        qkv = d_model * (d_model + 2 * self.kv_heads(d_model) * self.head_dim)
        return qkv + d_model * d_model

    def kv_cache_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        """K and V of the tokens a decoding cache holds after seq_len (a window bounds them)."""
        slots = seq_len if self.window is None else min(self.window, seq_len)
        return 2 * slots * self.kv_heads(d_model) * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class AttentionConfig(Config, BlockConfigMixin, AttentionShape):
    head_dim: int = head_dim_field()
    n_kv_heads: Optional[int] = n_kv_heads_field()
    positional: str = field("rope", "positional encoding inside attention", choices=("rope", "none"))
    rope_theta: float = rope_theta_field()
    rope_scaling: Optional[dict] = field(
        None, "RoPE frequency scaling of Llama 3.1 (null: none): {type: llama3, factor, "
        "low_freq_factor, high_freq_factor, original_max_position_embeddings}", nullable=True)

    window = None  # full causal attention

    def validate(self, d_model: int, path: str = "") -> None:
        validate_heads(d_model, self.head_dim, self.n_kv_heads, path)
        validate_rope_scaling(self.rope_scaling, path)

    def num_params(self, d_model: int) -> int:
        return d_model + self.attn_params(d_model)

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        ctx = avg_causal_context(seq_len, self.window)
        return float(2 * self.attn_params(d_model) + 4 * ctx * d_model)

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        return self.kv_cache_bytes(d_model, seq_len, dtype_bytes)

    def describe(self) -> str:
        kv = f" kv={self.n_kv_heads}" if self.n_kv_heads else ""
        win = f" w={self.window}" if self.window is not None else ""
        return f"{self.positional}{win}{kv}"


@dataclass(frozen=True)
class SWAConfig(AttentionConfig):
    window: int = field(2048, "keys within this many positions of the query (itself included)", ge=1)


class _AttentionBlock(Block):
    """x + Attention(RMSNorm(x))."""

    def __init__(self, cfg: AttentionConfig, d_model: int, n_layers: int):
        super().__init__(cfg, d_model, n_layers)
        self.norm = RMSNorm(d_model)
        self.attn = SelfAttention(d_model, cfg.head_dim, cfg.n_kv_heads, cfg.positional,
                                  cfg.rope_theta, cfg.window, n_layers, cfg.rope_scaling)

    def forward(self, x, aux=None):
        return x + self.attn(self.norm(x), seq_idx=aux.seq_idx if aux is not None else None)

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        return self.attn.allocate_cache(batch, max_len, device, dtype)

    def step(self, x, cache):
        return x + self.attn.step(self.norm(x), cache)

    def prefill(self, x, cache):
        return x + self.attn.prefill(self.norm(x), cache)


@register_block("attention", "A", AttentionConfig, "full causal multi-head attention (RoPE, GQA), pre-norm residual")
class AttentionBlock(_AttentionBlock):
    pass


@register_block("swa", "W", SWAConfig, "sliding-window causal attention, pre-norm residual")
class SWABlock(_AttentionBlock):
    pass
