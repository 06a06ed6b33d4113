"""The SSD's toy-size fault on the GPU (thirteenth session): the Triton scan itself, forward and
backward, at one shape, bypassing `ssd.triton_shape` (which sends P < 16 with N < 16 to the
reference). On the H100, P = N = 8 in bf16 raised an illegal memory access in `_bwd_dx_db`;
fp32, and P or N of 16, ran. For compute-sanitizer:

    source scripts/gpu_env.sh; cd /tmp
    CUDA_LAUNCH_BLOCKING=1 compute-sanitizer --tool memcheck python -P $ROOT/scripts/gpu_ssd_toy.py 4 32 8 8 8 1 16 bfloat16

Arguments: batch, length, heads, P, N, groups, chunk, dtype. Prints the largest difference from
the reference, or the error.
"""
import sys

import torch

from hybridlab.kernels.ssd import ssd_chunked_ref
from hybridlab.kernels import ssd_triton


def main():
    b, l, h, p, n, g, q = (int(v) for v in sys.argv[1:8])
    dtype = getattr(torch, sys.argv[8])
    torch.manual_seed(0)
    leaves = [torch.randn(b, l, h, p), torch.randn(b, l, h) - 1, -(torch.rand(h) + 0.5),
              torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h), torch.randn(h)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # the CPU: with TRITON_INTERPRET=1
    x, dt, A, B, C, D, dt_bias = (t.to(dev).to(dtype if i in (0, 1, 3, 4) else torch.float32).requires_grad_()
                                  for i, t in enumerate(leaves))
    y = ssd_triton.ssd_chunked(x, dt, A, B, C, q, D, None, dt_bias, True, None, None, None, False)
    grads = torch.autograd.grad(y.float().sum(), (x, dt, A, B, C, D, dt_bias))
    if dev == "cuda":
        torch.cuda.synchronize()
    ref_in = [t.detach().float().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
    want = ssd_chunked_ref(*ref_in[:5], chunk_size=q, D=ref_in[5], dt_bias=ref_in[6])
    ref = torch.autograd.grad(want.sum(), ref_in)
    print(f"{sys.argv[1:]}: y max diff {(y.float() - want).abs().max().item():.3g}; grads "
          + " ".join(f"{(a.float() - r).abs().max().item():.3g}" for a, r in zip(grads, ref)))


if __name__ == "__main__":
    main()
