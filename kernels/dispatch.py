"""Pick a kernel backend: Triton on CUDA, the pure-torch reference elsewhere.

`HYBRIDLAB_KERNELS=triton|reference` forces one. A kernel module registers its Triton
implementation lazily, so importing this package never imports triton.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "reference")


def requested_backend() -> str | None:
    value = os.environ.get("HYBRIDLAB_KERNELS", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"HYBRIDLAB_KERNELS={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


_TRITON: bool | None = None  # whether triton imports; found on first use


@torch.compiler.assume_constant_result  # traced as its value: no guard on _TRITON, whose first
def triton_available() -> bool:       # call (in the trace) sets it, which recompiled the model once
    # a module global rather than functools.lru_cache, which torch.compile traces around with a warning
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            _TRITON = True
        except ImportError:
            _TRITON = False
    return _TRITON


def triton_on_cpu() -> bool:
    """Whether a custom op's CPU implementation runs the Triton kernels (under the interpreter,
    HYBRIDLAB_KERNELS=triton) instead of the reference."""
    return requested_backend() == "triton"


def through_op() -> bool:
    """Whether a Triton kernel call goes through its torch.library custom op (under
    torch.compile, where the op is what traces as one node) or its autograd.Function (eager).
    A custom op's Python dispatch costs host time on every call: an isolated SAL fwd+bwd at
    B4 L4096 took 1.18 ms on the H200 through the op and 0.86 ms through the Function (two
    calls of the ninth session, docs/measurements/); an eager loop pays that in full, so
    eager calls skip it."""
    return torch.compiler.is_compiling()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on x's device, or None when autocast is off there."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton path should run for these inputs."""
    forced = requested_backend()
    if forced == "reference":
        return False
    if forced == "triton":
        # Forced Triton on CPU tensors only makes sense under the interpreter.
        return triton_available()
    return triton_available() and all(t.is_cuda for t in tensors if t is not None)


@functools.lru_cache(maxsize=None)
def triton_impl(module: str):
    """The Triton implementation module `hybridlab.kernels.<module>`, or None if not written."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(module):
            return None
        raise
