"""kernels/launch.py: an autotuned kernel launched through the autotuner once per key, then
with the remembered config directly (under TRITON_INTERPRET=1 on the CPU, conftest)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hybridlab.kernels import launch as launch_mod  # noqa: E402


@triton.autotune(configs=[triton.Config({"BLOCK": 8}, num_warps=1, num_stages=1)], key=["n"])
@triton.jit
def _scale(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=ok) * factor, mask=ok)


def test_launch_remembers_the_config_and_bypasses_the_autotuner(monkeypatch):
    launch_mod.forget()
    x = torch.randn(21)
    grid = lambda meta: (triton.cdiv(21, meta["BLOCK"]),)  # noqa: E731
    calls = []
    run = type(_scale).run
    monkeypatch.setattr(type(_scale), "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))

    y1 = torch.full_like(x, float("nan"))
    launch_mod.launch(_scale, grid, ("n21",), x, y1, 21, 3.0)
    assert calls == [1]  # first launch for this key: through the autotuner
    assert launch_mod._chosen[(_scale, ("n21",))][0] == {"BLOCK": 8}

    y2 = torch.full_like(x, float("nan"))
    launch_mod.launch(_scale, grid, ("n21",), x, y2, 21, -2.0)
    assert calls == [1]  # second: the JIT function directly, with the remembered config
    torch.testing.assert_close(y1, x * 3.0)
    torch.testing.assert_close(y2, x * -2.0)  # every element written, by a grid from BLOCK=8

    launch_mod.forget()
    launch_mod.launch(_scale, grid, ("n21",), x, y2, 21, 1.0)
    assert calls == [1, 1]
