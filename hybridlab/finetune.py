"""Training from pretrained weights: `training.init_from`, `freeze` and `lr_multipliers`.

A model part is named by a block type (every layer of that type), a layer index (`3`), or one of
the parts outside the layers (`embed`, `norm_f`, `head`). An upcycled model
(hybridlab/pretrained/upcycle.py) trains its inserted layers at a higher learning rate with
`lr_multipliers: {TYPE: 10}`, and may hold its pretrained layers still with `freeze: [TYPE]`.
Like the trainer, nothing here names a block type: the names come from the YAML and are checked
against the model's layers.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError, join_path
from .errors import UserError

OUTSIDE_LAYERS = ("embed", "norm_f", "head")


def load_init(model, init_from: str, base_dir: Path) -> Path:
    """Load the weights of the checkpoint `init_from` names (relative paths from `base_dir`, the
    YAML's folder) into `model`; every weight must fit. Returns the checkpoint folder."""
    from . import checkpoint as ckpt_io

    path = Path(init_from)
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        raise UserError(f"training.init_from: {init_from}: no such checkpoint or run folder "
                        f"(relative paths start at {base_dir})")
    ckpt = ckpt_io.resolve(path)
    ckpt_io.verify(ckpt)
    ckpt_io.load_weights(model, ckpt)
    return ckpt


def part_of(name: str, arch) -> tuple[str, int | None]:
    """A parameter name -> (block type or embed/norm_f/head, layer index or None)."""
    head, _, rest = name.partition(".")
    if head == "layers":
        i = int(rest.split(".", 1)[0])
        return arch.layers[i].block, i
    return head, None


def _check_names(keys, arch, path: str) -> None:
    types = {layer.block for layer in arch.layers}
    for i, key in enumerate(keys):
        where = join_path(path, i if isinstance(keys, list) else str(key))
        if isinstance(key, int):
            if key >= len(arch.layers):
                raise ConfigError(where, f"layer index {key} is past the last layer ({len(arch.layers) - 1})")
        elif key not in types and key not in OUTSIDE_LAYERS:
            known = ", ".join(sorted(types) + list(OUTSIDE_LAYERS))
            raise ConfigError(where, f"{key!r} is no part of this model; its parts: {known}")


def _matches(key, block: str, index: int | None) -> bool:
    return key == index if isinstance(key, int) else key == block


def freeze(model, arch, keys: list | None) -> int:
    """Set requires_grad False on the parameters of the parts `keys` names (training.freeze).
    Returns how many parameters (elements) are frozen."""
    if not keys:
        return 0
    _check_names(keys, arch, "training.freeze")
    frozen = 0
    for name, p in model.named_parameters():
        block, index = part_of(name, arch)
        if any(_matches(k, block, index) for k in keys):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def lr_multiplier(name: str, arch, multipliers: dict | None) -> float:
    """A layer index's multiplier wins over its block type's; 1 where neither is given."""
    if not multipliers:
        return 1.0
    block, index = part_of(name, arch)
    if index is not None and index in multipliers:
        return float(multipliers[index])
    return float(multipliers.get(block, 1.0))


def param_groups(model, arch, weight_decay: float, lr: float, multipliers: dict | None = None) -> list[dict]:
    """AdamW groups: decay on matrices and embeddings, not on norms, biases or SSM parameters
    (A_log, D, dt_bias); each at lr times its part's multiplier. Frozen parameters
    (requires_grad False) are left out. The scheduler scales every group's lr by the same factor,
    so a multiplier holds over the whole schedule."""
    if multipliers:
        _check_names(multipliers, arch, "training.lr_multipliers")
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # a shared block's parameters come once
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
        groups.setdefault((decay, lr_multiplier(name, arch, multipliers)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * m}
            for (decay, m), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
