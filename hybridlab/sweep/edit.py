"""Parameter values -> an architecture mapping and a training section.

A parameter is a path into the architecture:

    BLOCK.period / BLOCK.offset / BLOCK.positions
                                        placement of a block type that declares one
                                        (Block.placement): regenerates the layer list
    BLOCK.FIELD                         a field of every layer of that block type
    d_model, tie_embeddings, ...        a model field
    training.lr, training.seq_len, ...  a training setting

Placement works on the base's explicit layer list with the placed type's layers taken out (the
backbone): a layer of that type (configured like the base's first one) goes right after each
chosen anchor, a block of the type its Placement names. What a block type is placed after comes
from its hook, so nothing here names a block type.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

PLACEMENT_KEYS = ("period", "offset", "positions")


@dataclass(frozen=True)
class Target:
    """Where a parameter path points; resolved once when the space is loaded."""

    kind: str  # "placement" | "block" | "model" | "training"
    key: str
    block: str | None = None  # the block type a "block" or "placement" path names


def placement_of(block: str):
    """The block type's Placement hook (blocks/base.py), None when a sweep cannot place it."""
    from hybridlab.blocks import REGISTRY

    spec = REGISTRY.get(block)
    return spec.module_cls.placement if spec else None


def count_blocks(layers: list[dict], block: str) -> int:
    return sum(1 for layer in layers if layer["block"] == block)


def parse_positions(value) -> list[int]:
    """'2,4,6' (how Optuna stores a categorical list) or [2, 4, 6] -> [2, 4, 6]."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    return [int(v) for v in value]


def chosen_anchors(n_anchors: int, period: int | None = None, offset: int = 0,
                   positions=None) -> list[int]:
    """1-based anchor indices followed by a placed layer.

    period p, offset o: after anchor k (k = 1..n) when (k + o) % p == 0. Offset 0 closes every
    group of p anchors with a placed layer (p = 6 is Taipan's 6:1 layout); offset o moves them
    o anchors earlier. The offset is taken modulo p, so one static range serves every period."""
    if positions is not None:
        return sorted(set(parse_positions(positions)))
    p = period if period is not None else n_anchors
    return [k for k in range(1, n_anchors + 1) if (k + offset % p) % p == 0]


def place(layers: list[dict], block: str, anchor: str, template: dict, after: list[int]) -> list[dict]:
    """The layers without `block`'s, with a copy of `template` after the chosen anchors."""
    backbone = [layer for layer in layers if layer["block"] != block]
    out, k = [], 0
    for layer in backbone:
        out.append(layer)
        if layer["block"] == anchor:
            k += 1
            if k in after:
                out.append(dict(template))
    return out


def layer_template(arch_dict: dict, block: str) -> dict:
    """The base's first (unshared) layer of `block`, or one with the config's defaults when the
    base has none."""
    for layer in arch_dict["layers"]:
        if layer["block"] == block and "share" not in layer:
            return {k: v for k, v in layer.items() if k != "name"}
    return {"block": block}


def placements(targets: dict[str, Target], values: dict) -> dict[str, dict]:
    """block type -> its placement keys' values, e.g. {"X": {"period": 3, "offset": 1}}."""
    out: dict[str, dict] = {}
    for path, t in targets.items():
        if t.kind == "placement":
            out.setdefault(t.block, {})[t.key] = values[path]
    return out


def apply(base: dict, training: dict, targets: dict[str, Target], values: dict) -> tuple[dict, dict]:
    """(architecture mapping, training mapping) for one point of the space; nothing validated
    here: parse_arch / parse_training do that and name the offending path."""
    arch, train = copy.deepcopy(base), dict(training)
    for block, keys in placements(targets, values).items():
        anchor = placement_of(block).after
        after = chosen_anchors(count_blocks(arch["layers"], anchor), keys.get("period"),
                               keys.get("offset", 0), keys.get("positions"))
        arch["layers"] = place(arch["layers"], block, anchor, layer_template(base, block), after)
    for path, t in targets.items():
        value = values[path]
        if t.kind == "block":
            for layer in arch["layers"]:
                if layer["block"] == t.block and "share" not in layer:
                    layer[t.key] = value
        elif t.kind == "model":
            arch[t.key] = value
        elif t.kind == "training":
            train[t.key] = value
    return arch, train
