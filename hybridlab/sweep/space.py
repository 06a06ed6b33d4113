"""Search-space YAML -> a validated SearchSpace. Every mistake is found here, before any trial
trains, and named by its YAML path (`parameters.BLOCK.FIELD.high: ...`). search_spaces/ has
real ones; the shape:

    study: tiny                              # study name; output in <out_dir>/<study>/
    base: ../experiments/taipan-tiny.yaml    # base architecture (relative to this file)
    training: {steps: 120, seq_len: 64}      # over the base's training section
    sampler: {type: tpe, seed: 0}            # tpe | nsga2 | random, always seeded
    trials: 10                               # total over every worker and every resume
    workers: 2
    measure: {context: 256, decode_steps: 8} # decode_ms / prefill_tokens_per_s (best of repeats: 3), state_bytes
    objectives:
      - {metric: val_ppl, direction: minimize}
      - {metric: decode_ms}                  # direction defaults to the metric's natural one
    constraints:
      - {metric: params, max: 400000}        # analytic: checked before the trial trains
    parameters:                              # paths into the architecture (edit.py)
      BLOCK.period: {type: int, low: 1, high: 6}          # placement (a block type's Placement hook)
      BLOCK.FIELD: {type: float, low: 0.05, high: 0.25}   # a field of every layer of that type
      training.lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlab.config import ConfigError, is_plain_name, join_path, suggest

from .edit import Target, apply
from .params import Param, parse_params, probe

SPACE_KEYS = ("study", "description", "base", "out_dir", "training", "sampler", "trials", "timeout",
              "workers", "threads", "measure", "objectives", "constraints", "parameters", "best", "gpu")
SAMPLERS = ("tpe", "nsga2", "random")


@dataclass(frozen=True)
class Metric:
    kind: str        # analytic (from configs, before training) | trained | measured (after training)
    direction: str   # the natural direction
    help: str


METRICS = {
    "val_loss": Metric("trained", "minimize", "validation cross-entropy (nats/token)"),
    "val_ppl": Metric("trained", "minimize", "validation perplexity"),
    "recall_acc": Metric("trained", "maximize", "answer accuracy on a recall task (val/acc)"),
    "train_loss": Metric("trained", "minimize", "smoothed training loss at the end"),
    "tokens_per_s": Metric("trained", "maximize", "training throughput"),
    "decode_ms": Metric("measured", "minimize", "decode latency per token after measure.context tokens"),
    "prefill_tokens_per_s": Metric("measured", "maximize", "prefill throughput over measure.context tokens"),
    "flops_per_token": Metric("analytic", "minimize", "forward FLOPs per token at the training seq_len"),
    "state_bytes": Metric("analytic", "minimize", "decoding cache bytes after measure.context tokens"),
    "params": Metric("analytic", "minimize", "parameter count"),
}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class Constraint:
    metric: str
    max: float | None = None
    min: float | None = None

    def excess(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible."""
        out = -float("inf")
        if self.max is not None:
            out = max(out, value - self.max)
        if self.min is not None:
            out = max(out, self.min - value)
        return out

    def describe(self) -> str:
        parts = ([f"<= {self.max:g}"] if self.max is not None else []) + \
                ([f">= {self.min:g}"] if self.min is not None else [])
        return f"{self.metric} {' and '.join(parts)}"


@dataclass
class SearchSpace:
    source: str
    study: str
    base_dict: dict               # the base architecture, normalised (explicit layer list)
    base_dir: Path                # relative data paths resolve against the base YAML's folder
    training: dict
    sampler: dict
    objectives: list[Objective]
    constraints: list[Constraint]
    params: list[Param]
    trials: int = 10
    timeout: float | None = None
    workers: int = 1
    threads: int | None = None
    measure: dict = field(default_factory=lambda: {"context": 256, "decode_steps": 8, "repeats": 3})
    out_dir: str = "sweeps"
    best: str = ""
    description: str = ""

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def folder(self) -> Path:
        return Path(self.out_dir) / self.study

    def targets(self) -> dict[str, Target]:
        return {p.path: p.target for p in self.params}

    def build(self, values: dict, name: str | None = None):
        """-> (Arch, training mapping) for one point; ConfigError names what is wrong."""
        from hybridlab.graph import parse_arch
        from hybridlab.train_config import parse_training

        arch_dict, training = apply(self.base_dict, self.training, self.targets(), values)
        if name:
            arch_dict["name"] = name
        arch = parse_arch(arch_dict)
        parse_training(training)
        return arch, training

    def needs(self, kind: str) -> bool:
        metrics = [o.metric for o in self.objectives] + [c.metric for c in self.constraints]
        return any(METRICS[m].kind == kind for m in metrics)


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise ConfigError("", "file not found" if not path.exists() else "is not a file", src)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("", f"not valid YAML: {str(e).splitlines()[0]}", src) from None
    try:
        import torch

        gpu = _gpu_variant(data)
        if gpu is None:
            space = _parse(data, path)
            if torch.cuda.is_available():  # one worker per GPU
                space.workers = torch.cuda.device_count()
            return space
        on_gpu = torch.cuda.is_available()
        active, other = (gpu, data) if on_gpu else (data, gpu)
        space = _parse(active, path)
        try:  # check the variant not used here too, so its mistakes show at once
            _parse(other, path)
        except ConfigError as e:
            raise ConfigError(e.path if on_gpu else join_path("gpu", e.path),
                              f"{e.message} (in the {'CPU' if on_gpu else 'GPU'} variant)") from None
        if on_gpu and "workers" not in data["gpu"]:  # one worker per GPU unless gpu.workers says
            space.workers = torch.cuda.device_count()
        return space
    except ConfigError as e:
        raise e.with_source(src) if not e.source else e


def _gpu_variant(data):
    """The space with its `gpu:` section laid over it (training and measure merged key by key)."""
    if not isinstance(data, dict) or "gpu" not in data:
        return None
    gpu = data["gpu"]
    _need(isinstance(gpu, dict), "gpu", "must be a mapping of settings that replace the top-level ones on a GPU")
    for key in gpu:
        _need(key in SPACE_KEYS and key not in ("study", "gpu", "out_dir"), join_path("gpu", str(key)),
              f"cannot be set per device{suggest(str(key), SPACE_KEYS)}")
    out = {k: v for k, v in data.items() if k != "gpu"}
    for key, value in gpu.items():
        merge = key in ("training", "measure") and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if merge else value
    return out


def _need(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(path, msg)


def _int(data: dict, key: str, default, lo: int = 1):
    value = data.get(key, default)
    if value is None and default is None:
        return None
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= lo, key,
          f"must be an integer >= {lo}, got {value!r}")
    return value


def _parse(data: Any, path: Path) -> SearchSpace:
    from hybridlab.graph import load_arch
    from hybridlab.train_config import parse_training

    _need(isinstance(data, dict), "", "a search space is a mapping (study:, base:, objectives:, parameters:)")
    for key in data:
        _need(key in SPACE_KEYS, str(key), f"unknown key{suggest(str(key), SPACE_KEYS)}; known: {', '.join(SPACE_KEYS)}")
    _need("base" in data, "base", "missing: the base architecture YAML, e.g. base: ../experiments/taipan-tiny.yaml")
    base_path = (path.parent / str(data["base"])).resolve()
    _need(base_path.is_file(), "base", f"file not found: {base_path}")
    base = load_arch(base_path)
    raw_base = yaml.safe_load(base_path.read_text())
    training = {**(raw_base.get("training") or {}), **(data.get("training") or {})}
    for key in ("runs_dir", "run_name"):  # the sweep decides where trials go
        training.pop(key, None)
    cfg, data_spec = parse_training(training, source=f"{path}: training")
    from hybridlab.data import make_dataset
    from hybridlab.errors import UserError

    try:  # a bad data spec or a vocabulary too small for it fails here, not in every trial
        dataset = make_dataset(data_spec, cfg.seq_len, path="training.data", base_dir=base_path.parent)
    except UserError as e:
        raise ConfigError("training.data", str(e)) from None
    _need(dataset.vocab_size <= base.vocab_size, "training.data",
          f"the data uses {dataset.vocab_size} token ids but the base's vocab_size is {base.vocab_size}")

    study = str(data.get("study") or path.stem)
    # the study is one folder inside out_dir: a name with a separator or '..' would write elsewhere
    _need(is_plain_name(study), "study",
          f"must be a plain folder name (no '/', '..' or absolute path), got {study!r}")
    space = SearchSpace(
        source=str(path), study=study, base_dict=base.to_dict(),
        base_dir=base_path.parent, training=training, sampler=_sampler(data.get("sampler")),
        objectives=_objectives(data.get("objectives"), training),
        constraints=_constraints(data.get("constraints")), params=[],
        trials=_int(data, "trials", 10), timeout=data.get("timeout"), workers=_int(data, "workers", 1),
        threads=_int(data, "threads", None), out_dir=str(data.get("out_dir", "sweeps")),
        description=str(data.get("description", "")))
    _need(space.timeout is None or (isinstance(space.timeout, (int, float)) and space.timeout > 0),
          "timeout", f"must be seconds > 0 (or null), got {space.timeout!r}")
    measure = data.get("measure") or {}
    _need(isinstance(measure, dict) and set(measure) <= {"context", "decode_steps", "repeats"}, "measure",
          "takes context (tokens before timing), decode_steps (timed) and repeats (the best counts)")
    space.measure = {"context": 256, "decode_steps": 8, "repeats": 3, **measure}
    for key, value in space.measure.items():
        _need(isinstance(value, int) and value >= 1, join_path("measure", key), f"must be an integer >= 1, got {value!r}")
    best = data.get("best", space.objectives[0].metric)
    _need(best in [o.metric for o in space.objectives], "best",
          f"must name one of the objectives ({', '.join(o.metric for o in space.objectives)}), got {best!r}")
    space.best = best
    space.params = parse_params(data.get("parameters"), space)
    probe(space)
    return space


def _sampler(raw) -> dict:
    _need(isinstance(raw, (dict, type(None))), "sampler", "must be a mapping like {type: tpe, seed: 0}")
    cfg = {"type": "tpe", "seed": 0, **(raw or {})}
    _need(cfg["type"] in SAMPLERS, "sampler.type", f"must be one of {', '.join(SAMPLERS)}, got {cfg['type']!r}")
    _need(isinstance(cfg["seed"], int), "sampler.seed", f"must be an integer, got {cfg['seed']!r}")
    from .study import make_sampler

    try:
        make_sampler(cfg)
    except TypeError as e:
        raise ConfigError("sampler", f"bad setting for {cfg['type']}: {e}") from None
    return cfg


def _is_task(data_spec) -> bool:
    from hybridlab.data import TASKS

    return (isinstance(data_spec, dict) and "task" in data_spec) or (isinstance(data_spec, str) and data_spec in TASKS)


def _metric(name, where: str) -> str:
    _need(isinstance(name, str) and name in METRICS, where,
          f"unknown metric {name!r}{suggest(str(name), METRICS)}; known: {', '.join(METRICS)}")
    return name


def _objectives(raw, training: dict) -> list[Objective]:
    _need(isinstance(raw, list) and raw, "objectives", "list at least one, e.g. - {metric: val_ppl, direction: minimize}")
    out = []
    for i, item in enumerate(raw):
        where = f"objectives[{i}]"
        item = {"metric": item} if isinstance(item, str) else item
        _need(isinstance(item, dict) and set(item) <= {"metric", "direction"}, where,
              "must be {metric: NAME, direction: minimize|maximize}")
        metric = _metric(item.get("metric"), join_path(where, "metric"))
        direction = item.get("direction", METRICS[metric].direction)
        _need(direction in ("minimize", "maximize"), join_path(where, "direction"),
              f"must be minimize or maximize, got {direction!r}")
        _need(metric not in [o.metric for o in out], join_path(where, "metric"), f"{metric} is listed twice")
        if metric == "recall_acc":
            _need(_is_task(training.get("data", "default")), join_path(where, "metric"),
                  f"recall_acc needs a recall task as training.data (e.g. {{task: mqar}}), "
                  f"not {training.get('data', 'default')!r}")
        out.append(Objective(metric, direction))
    return out


def _constraints(raw) -> list[Constraint]:
    _need(isinstance(raw, (list, type(None))), "constraints", "must be a list like - {metric: params, max: 1.0e+6}")
    out = []
    for i, item in enumerate(raw or []):
        where = f"constraints[{i}]"
        _need(isinstance(item, dict) and set(item) <= {"metric", "max", "min"} and ("max" in item or "min" in item),
              where, "must be {metric: NAME, max: X} and/or min: Y")
        metric = _metric(item.get("metric"), join_path(where, "metric"))
        for key in ("max", "min"):
            v = item.get(key)
            _need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), join_path(where, key),
                  f"must be a number, got {v!r}")
        out.append(Constraint(metric, item.get("max"), item.get("min")))
    return out
