"""Launch an autotuned Triton kernel without the autotuner's per-call dispatch.

`triton.autotune`'s `Autotuner.run` rebuilds its cache key from every argument on each call:
~60 us of host time per launch on the H200's host (cProfile, docs/measurements/README.md,
eighth session). Inside a training step the host runs ahead of the GPU and that hides, but a
SAL or SSD call at the training length is short enough that the host's issue time *is* its
wall time. `launch` asks the autotuner once per key the caller names (tuning, or reading the
autotuner's own cache), remembers the config it chose, and afterwards launches the JIT function
with that config directly.

The caller's key must name whatever makes a config faster or slower (the autotuner's `key`
arguments and the dtypes). Any config is *correct* for any call: a key coarser than the
autotuner's can cost speed, never results.
"""
from __future__ import annotations

from typing import Callable, Hashable

from triton.runtime.autotuner import Autotuner

# (kernel, caller's key) -> (the config's meta-parameters, its launch options)
_chosen: dict[tuple[Autotuner, Hashable], tuple[dict, dict]] = {}


def launch(kernel, grid: tuple | Callable[[dict], tuple], key: Hashable, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), through the autotuner only the first time for `key`.

    grid: a tuple, or a function of the config's meta-parameters (as for `kernel[grid]`)."""
    if not isinstance(kernel, Autotuner):
        kernel[grid](*args, **kwargs)
        return
    chosen = _chosen.get((kernel, key))
    if chosen is None:
        kernel[grid](*args, **kwargs)  # tunes, or takes the config the autotuner already chose
        config = kernel.best_config
        if config.pre_hook is not None:  # none of ours has one; launching around it would skip it
            raise RuntimeError(f"launch: {kernel.base_fn.__name__}'s config has a pre_hook")
        _chosen[(kernel, key)] = (dict(config.kwargs), config.all_kwargs())
        return
    meta, options = chosen
    kernel.fn[grid(meta) if callable(grid) else grid](*args, **kwargs, **options)


def forget() -> None:
    """Drop the remembered configs (tests; a process that re-tunes)."""
    _chosen.clear()
