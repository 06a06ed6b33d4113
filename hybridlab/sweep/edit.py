"""Parameter values -> an architecture mapping and a training section.

A parameter is a path into the architecture:

    sal.period / sal.offset / sal.positions   SAL placement: regenerates the layer list
    sal.capacity, mamba2.d_state, ...         a field of every layer of that block type
    d_model, tie_embeddings, ...              a model field
    training.lr, training.seq_len, ...        a training setting

Placement works on the base's explicit layer list with its SALs taken out (the backbone): a SAL
(configured like the base's first SAL) goes right after the chosen Mamba-2 blocks.
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
    block: str | None = None


def parse_positions(value) -> list[int]:
    """'2,4,6' (how Optuna stores a categorical list) or [2, 4, 6] -> [2, 4, 6]."""
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    return [int(v) for v in value]


def sal_after(n_mamba: int, period: int | None = None, offset: int = 0,
              positions=None) -> list[int]:
    """1-based Mamba-2 block indices followed by a SAL.

    period p, offset o: after block k (k = 1..n) when (k + o) % p == 0. Offset 0 closes every
    group of p Mamba-2 blocks with a SAL (p = 6 is Taipan's 6:1 layout); offset o moves the SALs
    o blocks earlier. The offset is taken modulo p, so one static range serves every period."""
    if positions is not None:
        return sorted(set(parse_positions(positions)))
    p = period if period is not None else n_mamba
    return [k for k in range(1, n_mamba + 1) if (k + offset % p) % p == 0]


def place_sals(layers: list[dict], template: dict, after: list[int]) -> list[dict]:
    backbone = [layer for layer in layers if layer["block"] != "sal"]
    out, k = [], 0
    for layer in backbone:
        out.append(layer)
        if layer["block"] == "mamba2":
            k += 1
            if k in after:
                out.append(dict(template))
    return out


def sal_template(arch_dict: dict) -> dict:
    """The base's first (unshared) SAL layer, or a default SAL when the base has none."""
    for layer in arch_dict["layers"]:
        if layer["block"] == "sal" and "share" not in layer:
            return {k: v for k, v in layer.items() if k != "name"}
    return {"block": "sal"}


def apply(base: dict, training: dict, targets: dict[str, Target], values: dict) -> tuple[dict, dict]:
    """(architecture mapping, training mapping) for one point of the space; nothing validated
    here: parse_arch / parse_training do that and name the offending path."""
    arch, train = copy.deepcopy(base), dict(training)
    placement = {t.key: values[p] for p, t in targets.items() if t.kind == "placement"}
    if placement:
        n_mamba = sum(1 for layer in arch["layers"] if layer["block"] == "mamba2")
        after = sal_after(n_mamba, placement.get("period"), placement.get("offset", 0),
                          placement.get("positions"))
        arch["layers"] = place_sals(arch["layers"], sal_template(base), after)
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
