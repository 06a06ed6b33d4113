"""Kernels shared by every block: Triton on CUDA, pure-torch references everywhere.

Each public function dispatches (see `dispatch.py`); each `*_ref` is the definition the
Triton version is tested against. Nothing here imports triton at import time.
"""
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .mamba2_mixer import mamba2_mixer, mamba2_mixer_ref
from .norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref
from .selective_attention import (
    attention_by_position,
    selective_attention,
    selective_attention_decode,
    selective_attention_decode_ref,
    selective_attention_ref,
)
from .ssd import seq_idx_from_cu_seqlens, ssd_chunked, ssd_chunked_ref, ssd_naive, ssd_step, ssd_step_ref

__all__ = [
    "linear_cross_entropy", "linear_cross_entropy_ref",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "gated_rms_norm", "gated_rms_norm_ref", "rms_norm", "rms_norm_ref", "mamba2_mixer", "mamba2_mixer_ref",
    "attention_by_position", "selective_attention", "selective_attention_decode", "selective_attention_decode_ref",
    "selective_attention_ref",
    "seq_idx_from_cu_seqlens", "ssd_chunked", "ssd_chunked_ref", "ssd_naive", "ssd_step", "ssd_step_ref",
]
