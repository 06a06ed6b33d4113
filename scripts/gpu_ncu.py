"""One forward+backward of a kernel family inside a profiler range, after autotuning, for
Nsight Compute. `ssd` (default): the SSD scan at B8 L8192 (H24 P64 N128, chunk 256, bf16);
`attention`: the selective attention at B4 L16384 H12 D64, window 2048, C = 0.15.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python -P scripts/gpu_ncu.py [attention]
"""
import sys

import torch

if sys.argv[1:] == ["attention"]:
    from hybridlab.benchmarks.attention import random_selection
    from hybridlab.kernels import selective_attention_triton as sat

    q, k, v = (torch.randn(4, 16384, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    mask = random_selection(4, 16384, 0.15, "cuda")

    def step():
        o = sat.selective_attention(q, k, v, q_mask=mask, window=2048)
        torch.autograd.grad(o, (q, k, v), do)
else:
    from hybridlab.benchmarks.ssd import inputs
    from hybridlab.kernels import ssd_triton

    x, dt, A, B, C, D, dt_bias = inputs(8, 8192, 24, 64, 128, 1)
    leaves = [t.requires_grad_() for t in (x, dt, B, C)]
    dy = torch.randn_like(x)

    def step():
        y = ssd_triton.ssd_chunked(x, dt, A, B, C, chunk_size=256, D=D, dt_bias=dt_bias)
        torch.autograd.grad(y, leaves, dy)


for _ in range(3):  # autotune and warm up outside the profiled range
    step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
