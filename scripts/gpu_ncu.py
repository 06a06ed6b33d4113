"""One SSD forward+backward at B8 L8192 (H24 P64 N128, chunk 256, bf16) inside a profiler range,
after autotuning, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats python -P scripts/gpu_ncu.py
"""
import torch

from hybridlab.benchmarks.ssd import _inputs
from hybridlab.kernels import ssd_triton

x, dt, A, B, C, D, dt_bias = _inputs(8, 8192, 24, 64, 128, 1)
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
