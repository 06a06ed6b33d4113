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


def test_make_configs_appends_to_the_lists_and_keeps_the_module_whole(tmp_path):
    out = tmp_path / "sat_cfg.py"
    run = subprocess.run([sys.executable, str(VARIANTS / "make_configs.py"), str(out),
                          "--dkdv", "16,64,4,3,128;16,128,8,3", "--fwd", "64,32,4,3,96"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    spec = importlib.util.spec_from_file_location("sat_cfg", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from hybridlab.kernels import selective_attention_triton as cur
    assert mod._DKDV_CONFIGS == cur._DKDV_CONFIGS + [(16, 64, 4, 3, 128), (16, 128, 8, 3)]
    assert mod._FWD_CONFIGS == cur._FWD_CONFIGS + [(64, 32, 4, 3, 96)]
    assert mod._DQ_CONFIGS == cur._DQ_CONFIGS
    bad = subprocess.run([sys.executable, str(VARIANTS / "make_configs.py"), str(out), "--dq", "64,64"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "BM,BN,warps,stages" in bad.stderr
