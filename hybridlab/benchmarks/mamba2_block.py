"""A whole `mamba2` block against the SSD scan alone, forward+backward (issue 3's "no slower
than 1.5x the scan"): the block adds in-proj, conv1d, gated RMSNorm, out-proj and the
residual, all of which should cost less than the scan they feed.

    python -m hybridlab.benchmarks.mamba2_block [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _median_ms(fn, device, reps=20):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(json_path=None, batch=8, seq_len=8192, d_model=768, d_state=128, headdim=64, chunk=256,
        device=None) -> list[dict]:
    from hybridlab.blocks import REGISTRY
    from hybridlab.kernels import ssd_chunked

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = torch.bfloat16 if device.type == "cuda" else None
    cfg = REGISTRY["mamba2"].config_cls.from_dict(
        {"d_state": d_state, "headdim": headdim, "chunk_size": chunk}, d_model)
    block = REGISTRY["mamba2"].module_cls(cfg, d_model, 24).to(device)
    h = torch.randn(batch, seq_len, d_model, device=device, requires_grad=True)
    nheads = cfg.nheads(d_model)
    dtype = amp or torch.float32
    x = torch.randn(batch, seq_len, nheads, headdim, device=device, dtype=dtype, requires_grad=True)
    dt = torch.randn(batch, seq_len, nheads, device=device, dtype=dtype, requires_grad=True)
    B = torch.randn(batch, seq_len, 1, d_state, device=device, dtype=dtype, requires_grad=True)
    C = torch.randn(batch, seq_len, 1, d_state, device=device, dtype=dtype, requires_grad=True)
    A = -torch.exp(block.A_log.detach().float())

    def block_step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            y = block(h)
        y.backward(torch.ones_like(y))

    def scan_step():
        y = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, D=block.D, dt_bias=block.dt_bias)
        y.backward(torch.ones_like(y))

    block_ms, scan_ms = _median_ms(block_step, device), _median_ms(scan_step, device)
    row = {"shape": f"B{batch} L{seq_len} d{d_model} H{nheads} P{headdim} N{d_state}", "device": str(device),
           "block_fwd_bwd_ms": round(block_ms, 3), "scan_fwd_bwd_ms": round(scan_ms, 3),
           "ratio": round(block_ms / scan_ms, 2)}
    print(f"mamba2 block {row['shape']}: block fwd+bwd {block_ms:.3f} ms, SSD scan alone {scan_ms:.3f} ms, "
          f"ratio {row['ratio']:.2f} (target <= 1.5)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([row], f, indent=1)
    return [row]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    run(ap.parse_args().json)
