"""`hybridlab bench kernels|attention`: the kernel benchmarks, one table each, JSON optional."""
from __future__ import annotations

import json

import torch

from ..errors import UserError


def bench(what: str, json_path: str | None = None) -> int:
    if not torch.cuda.is_available():
        raise UserError(f"bench {what} times Triton kernels and needs a CUDA device; "
                        "the CPU has only the references")
    if what == "kernels":
        from . import mamba2_block, mamba_parts, ssd

        results = {"ssd": ssd.run(), "mamba_parts": mamba_parts.run(), "mamba2_block": mamba2_block.run()}
    else:
        from . import attention

        results = {"attention": attention.run()}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {json_path}")
    return 0
