"""Data parallelism under torchrun: DDP or FSDP2 around the single-device model.

torchrun starts one process per GPU and tells each who it is through WORLD_SIZE, RANK and
LOCAL_RANK; without them a run is one process and nothing here is used. Every process draws
the step's whole global batch (a pure function of the step) and keeps its own rows
[r*B/W, (r+1)*B/W), then splits them into micro-batches, so the data of a step is the same
whatever the number of processes or the micro-batch size. The model code stays single-device:
this module wraps it (DDP: a replica per process, gradients all-reduced; FSDP2: parameters,
gradients and optimizer state sharded, gathered a block at a time) and gives the training loop
the few collectives it needs (sums, agreement on stopping, buffers from rank 0).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass
class Dist:
    """Where this process stands: rank `rank` of `world`, GPU `local_rank` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    active: bool = False  # a process group is up (torchrun), even with one process

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values) -> torch.Tensor:
        """Element-wise sum over every process of a 1-D float64 tensor (or list of numbers)."""
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).flatten()
        if self.active:
            torch.distributed.all_reduce(t)
        return t

    def min(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj` (picklable) on every process."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def from_env() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) when started by torchrun (or any launcher that sets its
    variables), else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, "
                        f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}: not integers; start with torchrun") from None
    return rank, world, local


def setup(device: torch.device) -> Dist:
    """Join torchrun's process group (once per process; nccl on CUDA, gloo on CPU) and pin this
    process's GPU. `device` is what the training config asks for (its index is ignored here:
    under torchrun the GPU is cuda:LOCAL_RANK). One process without torchrun: an inactive Dist."""
    env = from_env()
    if env is None:
        return Dist(device=device)
    rank, world, local = env
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise UserError(f"LOCAL_RANK {local}: this node has {count} GPU(s); start at most {count} "
                            "processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        if device.type == "cuda":  # device_id: NCCL binds this GPU now (barriers need no guess)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
        atexit.register(_destroy)
    return Dist(rank, world, local, device, active=True)


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def local_micro_batches(batch: tuple, dist: Dist, micro: int) -> list[tuple]:
    """Rank r's rows [r*B/W, (r+1)*B/W) of the global batch, in micro-batches of `micro`
    sequences. Every tensor of `batch` (inputs, targets, anything else per sequence) is split
    the same way along dim 0."""
    B = batch[0].shape[0]
    share = B // dist.world
    start = dist.rank * share
    return [tuple(t[start + i:start + i + micro] for t in batch) for i in range(0, share, micro)]


def _fully_shard():
    """FSDP2's entry point and mixed-precision policy: torch.distributed.fsdp from torch 2.6,
    torch.distributed._composable.fsdp in 2.5."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def wrap(model, dist: Dist, parallel: str, amp):
    """The module the training loop calls: DDP around `model`, or `model` itself sharded in
    place by FSDP2 (each block its own unit, the root holding the embedding, final norm and
    head). Unwrapped when no process group is up."""
    if not dist.active:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy = _fully_shard()
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    # bf16 weights in the forward and backward, gradients reduced in fp32 (as torchtitan). No
    # casting of a unit's inputs: FSDP2 would rebuild the blocks' Aux argument, and the losses
    # and metrics they add to it would land in a copy (autocast runs the matmuls in bf16 anyway)
    mp = (MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if amp is not None else None)
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    uses = {}
    for block in model.layers:
        uses[id(block)] = uses.get(id(block), 0) + 1
    for block in model.layers:
        # a block shared by several layer positions runs more than once per forward: leave its
        # weights to the root unit rather than gather and free them twice
        if uses[id(block)] == 1:
            fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def no_sync(wrapped, last: bool):
    """DDP: skip the gradient all-reduce on every micro-batch but a step's last (the gradients
    accumulate locally, one all-reduce per step). FSDP2 reduce-scatters each micro-batch's
    gradients (holding unsharded gradients between micro-batches would cost the memory FSDP2
    is there to save); one process: nothing to skip."""
    import contextlib

    if last or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def sync_buffers(model, dist: Dist) -> None:
    """Rank 0's buffers on every process (e.g. a SAL's calibrated threshold, updated by each
    process from its own rows). DDP does this before every forward; with FSDP2 the loop calls
    it before validating and checkpointing, so every process validates and saves the same model."""
    if dist.active:
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
