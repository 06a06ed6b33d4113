"""Where a training step's wall time goes: the real training loop (`hybridlab train`) under
torch.profiler for a few steps after the compiled warm-up, then per step: wall time, the GPU's
kernel time and its idle share, and the host calls that wait for the GPU (stream/device
synchronisations, copies). For gaps the model alone does not show (issue 18: packed training
loses 7-9% in the loop, 2% in the model's kernels).

    source scripts/gpu_env.sh; cd /tmp
    python -P $ROOT/scripts/train_profile.py ARCH.yaml --skip 3 --active 2 [--trace DIR] \\
        --set "data={prepared: /tmp/prep}" --set pack_documents=true ...

Steps 1..skip run unprofiled (compilation, autotuning), then `active` steps are recorded;
`steps` is set to skip + active. `--trace DIR` also writes the Chrome/TensorBoard trace there.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from hybridlab import train as train_mod
from hybridlab.train_config import parse_override

# host calls whose time is the host waiting for the device, or a copy that may
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
         "cudaMemcpy", "aten::_local_scalar_dense", "aten::item")


def _busy_ms(events) -> float:
    """The GPU's busy time: the union of its kernels' and copies' intervals. Summing their
    durations counts twice what overlaps (kernels on two streams) and every GPU-side
    annotation (the profiler's step ranges, record_function ranges) spans kernels already
    counted; that sum read "busy 128.7%" in session 12."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and not e.name.startswith("ProfilerStep"))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--skip", type=int, default=3, help="unprofiled steps first (compile, autotune)")
    ap.add_argument("--active", type=int, default=2, help="profiled steps")
    ap.add_argument("--trace", help="folder for the profiler's trace (TensorBoard / Perfetto)")
    args = ap.parse_args()
    overrides = dict(parse_override(item) for item in args.set)
    overrides["steps"] = args.skip + args.active
    run = train_mod.prepare(args.arch, overrides=overrides)

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ends = []  # wall clock at the end of every step's accumulate()
    real_accumulate = train_mod.accumulate

    def accumulate(*a, **kw):
        out = real_accumulate(*a, **kw)
        prof.step()  # one profiler step per training step: a window from one accumulate to the next
        ends.append(time.perf_counter())
        return out

    train_mod.accumulate = accumulate
    on_ready = torch.profiler.tensorboard_trace_handler(args.trace) if args.trace else None
    with profile(activities=activities, schedule=schedule(wait=args.skip - 1, warmup=1, active=args.active),
                 on_trace_ready=on_ready) as prof:
        train_mod.train(run, quiet=True)
    train_mod.accumulate = real_accumulate

    events = prof.events()
    wall = (ends[args.skip + args.active - 1] - ends[args.skip - 1]) * 1e3 / args.active
    kernel_ms = _busy_ms(events) / args.active if cuda else 0.0
    print(f"{run.arch.name}: {args.active} profiled steps, {wall:.1f} ms wall a step")
    if cuda:
        print(f"  GPU kernels {kernel_ms:.1f} ms a step: busy {kernel_ms / wall:.1%}, idle {1 - kernel_ms / wall:.1%}")
    waits = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name in WAITS:
            n, ms = waits.get(e.name, (0, 0.0))
            waits[e.name] = (n + 1, ms + e.cpu_time_total / 1e3)
    for name, (n, ms) in sorted(waits.items(), key=lambda kv: -kv[1][1]):
        print(f"  host {name}: {n / args.active:.0f} calls, {ms / args.active:.1f} ms a step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
