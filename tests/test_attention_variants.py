"""The kernel variants waiting for a GPU A/B (scripts/attention_variants/) still build against
the current kernels and still compute the reference's attention and gradients: under the
interpreter at tiny shapes here, on the GPU through scripts/gpu_profile.py --attn."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from hybridlab.kernels.selective_attention import selective_attention_ref  # noqa: E402

VARIANTS = Path(__file__).resolve().parents[1] / "scripts" / "attention_variants"


def _build(script: str, out: Path):
    subprocess.run([sys.executable, str(VARIANTS / script), str(out)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location(out.stem, out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("window, kv_selected", [(8, False), (None, True)])
def test_kv_tma_variant_matches_the_reference(tmp_path, window, kv_selected):
    mod = _build("make_kv_tma.py", tmp_path / "sat_kv_tma.py")
    torch.manual_seed(0)
    b, L, hq, hkv, d = 2, 37, 4, 2, 16  # odd length, GQA, several 16-query tiles
    q, k, v = (torch.randn(b, L, h, d, requires_grad=True) for h in (hq, hkv, hkv))
    q_mask = torch.rand(b, L) < 0.4
    kv_mask = q_mask if kv_selected else None
    do = torch.randn(b, L, hq, d)
    got = mod.selective_attention(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=window)
    g_got = torch.autograd.grad(got, (q, k, v), do)
    want = selective_attention_ref(q, k, v, q_mask=q_mask, kv_mask=kv_mask, window=window)
    g_want = torch.autograd.grad(want, (q, k, v), do)
    for name, a, r in zip(("o", "dq", "dk", "dv"), (got, *g_got), (want, *g_want)):
        err = ((a - r).norm() / r.norm()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
