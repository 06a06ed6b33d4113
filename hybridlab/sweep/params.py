"""Parameters of a search space: paths into the architecture with their ranges, resolved and
checked at every bound before any trial runs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hybridlab.config import ConfigError, join_path, suggest

from .edit import PLACEMENT_KEYS, Target, chosen_anchors, count_blocks, parse_positions, placement_of


def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(path, msg)


@dataclass(frozen=True)
class Param:
    path: str
    target: Target
    type: str                     # int | float | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.type == "int":
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        if self.type == "float":
            return trial.suggest_float(self.path, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.path, list(self.choices))

    def probes(self) -> list[tuple[str, Any]]:
        """The values that bound the range: each must give a valid architecture."""
        if self.type == "categorical":
            return [(f"choices[{i}]", c) for i, c in enumerate(self.choices)]
        return [("low", self.low), ("high", self.high)]



def _target(p: str, space) -> Target:
    """Resolve a dotted path against the registry, the model and the training settings."""
    from hybridlab.blocks import REGISTRY
    from hybridlab.graph import ModelConfig
    from hybridlab.train_config import TrainConfig

    where = join_path("parameters", p)
    head, _, rest = p.partition(".")
    model_fields = [f.name for f in ModelConfig.fields() if f.name not in ("name", "description")]
    if not rest:
        placeable = "|".join(b for b in REGISTRY if placement_of(b)) or "BLOCK"
        _need(head in model_fields, where, f"unknown path into the architecture{suggest(head, model_fields)}; "
              f"use BLOCK.FIELD, {placeable}.period|offset|positions, training.FIELD, "
              f"or a model field ({', '.join(model_fields)})")
        return Target("model", head)
    if head == "training":
        names = [f.name for f in TrainConfig.fields() if f.name not in ("runs_dir", "run_name")]
        _need(rest in names, where, f"unknown training setting {rest!r}{suggest(rest, names)}")
        return Target("training", rest)
    _need(head in REGISTRY, where, f"unknown path into the architecture: no block {head!r}"
          f"{suggest(head, list(REGISTRY) + ['training'])}; blocks: {', '.join(REGISTRY)}")
    placement = placement_of(head)
    if placement and rest in PLACEMENT_KEYS:
        _need(count_blocks(space.base_dict["layers"], placement.after) > 0, where,
              f"{placement.label} placement needs {placement.after_label} blocks in the base architecture; "
              f"it has none")
        return Target("placement", rest, head)
    names = [f.name for f in REGISTRY[head].config_cls.fields()]
    extra = list(PLACEMENT_KEYS) if placement else []
    _need(rest in names, where, f"unknown path into the architecture: {head} has no field {rest!r}"
          f"{suggest(rest, names + extra)}; fields: {', '.join(names + extra)}")
    return Target("block", rest, head)


def parse_params(raw, space) -> list[Param]:
    _need(isinstance(raw, dict) and raw, "parameters",
          "map at least one path to a range, e.g. training.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}")
    out = []
    for p, spec in raw.items():
        p = str(p)
        where = join_path("parameters", p)
        target = _target(p, space)
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        _need(isinstance(spec, dict), where, "must be {type: int|float, low:, high:} or {type: categorical, choices: [...]}")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        _need(kind in ("int", "float", "categorical"), join_path(where, "type"),
              f"must be int, float or categorical, got {kind!r}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        for key in spec:
            _need(key in allowed, join_path(where, str(key)), f"not a key of a {kind} parameter; keys: {', '.join(sorted(allowed))}")
        if kind == "categorical":
            choices = spec.get("choices")
            _need(isinstance(choices, list) and choices, join_path(where, "choices"), "empty: list at least one value")
            if target.kind == "placement" and target.key == "positions":
                # Optuna's categorical values are scalars: a list of positions travels as "2,4,6"
                choices = [",".join(str(v) for v in c) if isinstance(c, list) else str(c) for c in choices]
            for i, c in enumerate(choices):
                _need(c is None or isinstance(c, (bool, int, float, str)), join_path(where, f"choices[{i}]"),
                      f"must be a number, string, boolean or null, got {c!r}")
            _need(len(set(map(repr, choices))) == len(choices), join_path(where, "choices"), "lists a value twice")
            out.append(Param(p, target, kind, choices=tuple(choices)))
            continue
        lo, hi, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
        num = int if kind == "int" else (int, float)
        for key, v in (("low", lo), ("high", hi)):
            _need(isinstance(v, num) and not isinstance(v, bool), join_path(where, key),
                  f"must be {'an integer' if kind == 'int' else 'a number'}, got {v!r}")
        _need(lo <= hi, where, f"empty range: low {lo} > high {hi}")
        _need(not log or lo > 0, join_path(where, "low"), f"a log range needs low > 0, got {lo}")
        _need(step is None or (isinstance(step, num) and step > 0 and not log), join_path(where, "step"),
              "must be a positive number, and not combined with log")
        out.append(Param(p, target, kind, lo if kind == "int" else float(lo), hi if kind == "int" else float(hi),
                         log, step))
    for block in dict.fromkeys(q.target.block for q in out if q.target.kind == "placement"):
        keys = {q.target.key for q in out if q.target.kind == "placement" and q.target.block == block}
        _need(not ("positions" in keys and keys & {"period", "offset"}), f"parameters.{block}.positions",
              f"give either {block}.positions or {block}.period/{block}.offset, not both")
    return out


def probe(space) -> None:
    """Build the architecture at every bound of every range (others at the base's values), so
    an impossible value fails here rather than in trial 17."""
    layers = space.base_dict["layers"]
    placed = {p.target.block for p in space.params if p.target.kind == "placement"}
    present = {layer["block"] for layer in layers} | placed
    for p in space.params:
        where = join_path("parameters", p.path)
        if p.target.kind == "block":
            _need(p.target.block in present, where, f"the base architecture has no {p.target.block} layer")
        for label, value in p.probes():
            if p.target.kind == "placement":
                _check_placement(p, value, layers, join_path(where, label))
            others = [q for q in space.params if q.target.kind == "placement" and q is not p]
            values = {p.path: value, **{q.path: _first(q) for q in others}}
            probe = dataclasses.replace(space, params=[p] + others)
            try:
                probe.build(values)
            except ConfigError as e:
                raise ConfigError(join_path(where, label), f"{value!r} gives an invalid architecture: {e}") from None


def _first(p: Param):
    return p.choices[0] if p.type == "categorical" else p.low


def _check_placement(p: Param, value, layers: list[dict], where: str) -> None:
    """A placement value must choose anchors the base has (counted in its layer list)."""
    placement = placement_of(p.target.block)
    n, placed, anchor = count_blocks(layers, placement.after), placement.label, placement.after_label
    if p.target.key == "positions":
        try:
            pos = parse_positions(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"must be a list of {anchor} block numbers, got {value!r}") from None
        bad = [k for k in pos if not 1 <= k <= n]
        if bad:
            raise ConfigError(where, f"{placed} after {anchor} block {bad[0]}: the base has {anchor} blocks 1..{n}")
    elif p.target.key == "period":
        _need(isinstance(value, int) and 1 <= value <= n, where,
              f"a period must be 1..{n} (the base's {anchor} blocks), got {value!r}; "
              f"a larger one places no {placed}")
        _need(chosen_anchors(n, value), where, f"places no {placed}")
    elif p.target.key == "offset":
        _need(isinstance(value, int) and value >= 0, where, f"must be an integer >= 0, got {value!r}")
