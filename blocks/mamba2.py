"""Mamba-2 block (Dao & Gu 2024): in-proj -> causal conv + SiLU -> SSD -> gated RMSNorm -> out-proj.

Sizes and initialisation follow mamba_ssm's `Mamba2` defaults. The block is pre-norm residual:
x + Mamba2(RMSNorm(x)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from hybridlab.kernels import (
    causal_conv1d,
    causal_conv1d_update,
    gated_rms_norm,
    mamba2_mixer,
    ssd_chunked,
    ssd_step,
)

from .base import Block, BlockConfigMixin
from .common import RMSNorm, init_linear
from hybridlab.config import Config, ConfigError, field, join_path
from .registry import register_block


@dataclass(frozen=True)
class Mamba2Config(Config, BlockConfigMixin):
    d_state: int = field(128, "SSM state size N per head", ge=1)
    headdim: int = field(64, "channels per SSM head P", ge=1)
    expand: int = field(2, "inner width d_inner = expand * d_model", ge=1)
    d_conv: int = field(4, "causal conv kernel width", ge=1, le=16)
    ngroups: int = field(1, "groups sharing B and C (like GQA for the SSM)", ge=1)
    chunk_size: int = field(256, "SSD chunk length Q", ge=8, le=1024)
    A_init_min: float = field(1.0, "A = -U(A_init_min, A_init_max) at init", gt=0)
    A_init_max: float = field(16.0, "upper end of A's init range", gt=0)
    dt_min: float = field(0.001, "dt init lower end (log-uniform)", gt=0)
    dt_max: float = field(0.1, "dt init upper end (log-uniform)", gt=0)
    norm_before_gate: bool = field(False, "gated norm as norm(x)*silu(z) instead of norm(x*silu(z))")
    conv_bias: bool = field(True, "bias in the causal conv")
    bias: bool = field(False, "bias in in/out projections")
    out_init_std: Optional[float] = field(
        None, "out_proj init: null keeps mamba_ssm's (Linear default / sqrt(n_layers)); a number "
        "draws N(0, (std / sqrt(2 n_layers))^2), the GPT-2 init of the other blocks' residual "
        "outputs. At toy widths mamba_ssm's init makes each block's output ~10x the 0.02-std "
        "embedding, burying token identity in the residual stream", gt=0, nullable=True)

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def nheads(self, d_model: int) -> int:
        return self.d_inner(d_model) // self.headdim

    def conv_dim(self, d_model: int) -> int:
        return self.d_inner(d_model) + 2 * self.ngroups * self.d_state

    def validate(self, d_model: int, path: str = "") -> None:
        d_inner = self.d_inner(d_model)
        if d_inner % self.headdim:
            raise ConfigError(join_path(path, "headdim"),
                              f"d_inner = expand * d_model = {d_inner} is not divisible by headdim {self.headdim}")
        if self.nheads(d_model) % self.ngroups:
            raise ConfigError(join_path(path, "ngroups"),
                              f"{self.nheads(d_model)} heads are not divisible into {self.ngroups} groups")
        if self.A_init_min > self.A_init_max:
            raise ConfigError(join_path(path, "A_init_min"), "must be <= A_init_max")
        if self.dt_min > self.dt_max:
            raise ConfigError(join_path(path, "dt_min"), "must be <= dt_max")

    def num_params(self, d_model: int) -> int:
        di, h, cd = self.d_inner(d_model), self.nheads(d_model), self.conv_dim(d_model)
        d_in_proj = 2 * di + 2 * self.ngroups * self.d_state + h
        bias = self.bias * (d_in_proj + d_model)
        conv = cd * self.d_conv + (cd if self.conv_bias else 0)
        return d_model + d_model * d_in_proj + conv + 3 * h + di + di * d_model + bias

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        di, h, n, p = self.d_inner(d_model), self.nheads(d_model), self.d_state, self.headdim
        g, q = self.ngroups, min(self.chunk_size, seq_len)
        proj = 2 * d_model * (2 * di + 2 * g * n + h) + 2 * di * d_model
        conv = 2 * self.conv_dim(d_model) * self.d_conv
        # SSD, chunked: intra-chunk (C B^T) and its product with x, plus state in and out.
        ssd = 2 * g * q * n + 2 * h * q * p + 4 * h * n * p
        return float(proj + conv + ssd)

    def state_bytes(self, d_model: int, seq_len: int, dtype_bytes: int = 2) -> int:
        # conv window in the model dtype; the SSM state is kept in fp32. Independent of seq_len.
        conv = self.conv_dim(d_model) * self.d_conv * dtype_bytes
        ssm = self.nheads(d_model) * self.headdim * self.d_state * 4
        return conv + ssm

    def describe(self) -> str:
        return f"N={self.d_state} P={self.headdim} x{self.expand}"


@register_block("mamba2", "M", Mamba2Config, "Mamba-2 mixer (SSD), pre-norm residual")
class Mamba2Block(Block):
    @classmethod
    def hparams(cls, configs):
        """The first Mamba-2 layer's state size (0 without one) as an HParams column."""
        return {"mamba2_d_state": configs[0].d_state if configs else 0}

    def __init__(self, cfg: Mamba2Config, d_model: int, n_layers: int):
        super().__init__(cfg, d_model, n_layers)
        self.d_inner = cfg.d_inner(d_model)
        self.nheads = cfg.nheads(d_model)
        self.conv_dim = cfg.conv_dim(d_model)
        gn = cfg.ngroups * cfg.d_state
        self.split = (self.d_inner, self.conv_dim, self.nheads)  # z, xBC, dt
        self.xbc_split = (self.d_inner, gn, gn)  # x, B, C

        self.norm = RMSNorm(d_model)
        self.in_proj = nn.Linear(d_model, sum(self.split), bias=cfg.bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                bias=cfg.conv_bias)
        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (mamba_ssm's init).
        dt = torch.exp(torch.rand(self.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads).uniform_(cfg.A_init_min, cfg.A_init_max)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm_gated = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=cfg.bias)
        # Shrink the residual branch's output by the depth (mamba_ssm), or GPT-2's init.
        if cfg.out_init_std is None:
            with torch.no_grad():
                self.out_proj.weight.div_(math.sqrt(n_layers))
        else:
            init_linear(self.out_proj, cfg.out_init_std / math.sqrt(2 * n_layers))

    def _ssd_inputs(self, xBC):
        x, B, C = torch.split(xBC, self.xbc_split, dim=-1)
        return x, B, C

    def _mix(self, h, z, xBC, dt, initial_states=None, seq_idx=None):
        """Conv'd xBC (B, L, conv_dim) -> SSD -> gated norm -> out-proj + residual: prefill,
        with carried states (training's forward runs the same three in `mamba2_mixer`).
        Returns (output, final SSM state or None). `seq_idx` (B, L): packed documents, the
        SSM state restarts at each."""
        cfg = self.cfg
        b, L, _ = h.shape
        x, B, C = self._ssd_inputs(xBC)
        out = ssd_chunked(
            x.reshape(b, L, self.nheads, cfg.headdim), dt, -torch.exp(self.A_log.float()),
            B.reshape(b, L, cfg.ngroups, cfg.d_state), C.reshape(b, L, cfg.ngroups, cfg.d_state),
            chunk_size=cfg.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
            initial_states=initial_states, return_final_states=initial_states is not None,
            seq_idx=seq_idx,
        )
        y, final = out if initial_states is not None else (out, None)  # y (b, L, H, P)
        y = gated_rms_norm(y.reshape(b, L, self.d_inner), z, self.norm_gated, eps=1e-5,
                           group_size=self.d_inner // cfg.ngroups,
                           norm_before_gate=cfg.norm_before_gate)
        return h + self.out_proj(y), final

    def forward(self, h, aux=None):
        # packed documents: neither the conv window nor the SSM state crosses a document start
        seq_idx = aux.seq_idx if aux is not None else None
        cfg = self.cfg
        # conv -> SSD -> gated norm from the in-projection's output (kernels/mamba2_mixer.py):
        # compiled, one op whose backward writes the in-projection's gradient as one tensor
        y = mamba2_mixer(self.in_proj(self.norm(h)), self.conv1d.weight[:, 0, :], self.conv1d.bias,
                         -torch.exp(self.A_log.float()), self.D, self.dt_bias, self.norm_gated, self.nheads,
                         cfg.headdim, cfg.ngroups, cfg.chunk_size, 1e-5, self.d_inner // cfg.ngroups,
                         cfg.norm_before_gate, seq_idx)                         # (b, L, d_inner)
        return h + self.out_proj(y)

    def allocate_cache(self, batch, max_len, device=None, dtype=None):
        cfg = self.cfg
        dtype = dtype or self.in_proj.weight.dtype
        return {
            "conv": torch.zeros(batch, self.conv_dim, cfg.d_conv, device=device, dtype=dtype),
            "ssm": torch.zeros(batch, self.nheads, cfg.headdim, cfg.d_state, device=device,
                               dtype=torch.float32),
        }

    def prefill(self, h, cache):
        """A chunk (B, T, d) continuing from `cache` (conv window and SSM state), updating it."""
        k = self.cfg.d_conv
        z, xBC, dt = torch.split(self.in_proj(self.norm(h)), self.split, dim=-1)
        history = torch.cat([cache["conv"].transpose(1, 2).to(xBC.dtype), xBC], dim=1)  # (B, k + T, conv_dim)
        cache["conv"].copy_(history[:, -k:].transpose(1, 2))
        # the conv sees the last k - 1 cached inputs before the chunk, then drops those outputs
        xBC = causal_conv1d(history[:, 1:], self.conv1d.weight[:, 0, :], self.conv1d.bias)[:, k - 1:]
        out, final = self._mix(h, z, xBC, dt, initial_states=cache["ssm"])
        cache["ssm"].copy_(final)
        return out

    def step(self, h, cache):
        cfg = self.cfg
        b = h.shape[0]
        z, xBC, dt = torch.split(self.in_proj(self.norm(h)), self.split, dim=-1)
        xBC = causal_conv1d_update(xBC, cache["conv"], self.conv1d.weight[:, 0, :], self.conv1d.bias)
        x, B, C = self._ssd_inputs(xBC)
        y = ssd_step(cache["ssm"], x.reshape(b, self.nheads, cfg.headdim), dt,
                     -torch.exp(self.A_log.float()), B.reshape(b, cfg.ngroups, cfg.d_state),
                     C.reshape(b, cfg.ngroups, cfg.d_state), D=self.D, dt_bias=self.dt_bias)
        y = gated_rms_norm(y.reshape(b, self.d_inner), z, self.norm_gated, eps=1e-5,
                           group_size=self.d_inner // cfg.ngroups,
                           norm_before_gate=cfg.norm_before_gate)
        return h + self.out_proj(y)
