"""Suites: several runs that share a training section, run by one command and compared.

    suite: mqar-recall
    runs_dir: runs                 # runs go to runs/<suite>/<run name>
    training: {...}                # over each architecture's own training section
    runs:
      - {arch: taipan-tiny.yaml}                                   # paths relative to this file
      - {arch: taipan-tiny.yaml, name: taipan-C0.05, defaults: {sal: {capacity: 0.05}}}

Running the same command again skips finished runs and resumes interrupted ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from . import checkpoint as ckpt_io
from .errors import ConfigError
from .graph import parse_arch
from .train import prepare, prepare_new, train

SUITE_KEYS = ("suite", "description", "runs_dir", "training", "runs", "compare")
RUN_KEYS = ("arch", "name", "defaults", "training")
DEFAULT_COLUMNS = ("params", "val/loss", "val/ppl", "val/acc", "tokens_per_s")


def is_suite(data) -> bool:
    return isinstance(data, dict) and "suite" in data


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plan(path: str) -> list[tuple[str, dict, Path]]:
    """-> [(run name, full architecture+training mapping, base dir)] with every error named."""
    src = Path(path)
    data = yaml.safe_load(src.read_text())
    for key in data:
        if key not in SUITE_KEYS:
            raise ConfigError(str(key), f"unknown suite key; known: {', '.join(SUITE_KEYS)}", str(src))
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError("runs", "must list at least one run, e.g. - {arch: taipan-tiny.yaml}", str(src))
    root = Path(data.get("runs_dir", "runs")) / str(data["suite"])
    out, names = [], set()
    for i, item in enumerate(runs):
        where = f"runs[{i}]"
        if not isinstance(item, dict) or "arch" not in item:
            raise ConfigError(where, "needs arch: PATH", str(src))
        for key in item:
            if key not in RUN_KEYS:
                raise ConfigError(f"{where}.{key}", f"unknown key; known: {', '.join(RUN_KEYS)}", str(src))
        arch_path = (src.parent / item["arch"]).resolve()
        if not arch_path.exists():
            raise ConfigError(f"{where}.arch", f"file not found: {arch_path}", str(src))
        arch = yaml.safe_load(arch_path.read_text())
        if item.get("defaults"):
            arch["defaults"] = _merge(arch.get("defaults") or {}, item["defaults"])
        training = _merge(_merge(arch.get("training") or {}, data.get("training") or {}), item.get("training") or {})
        name = item.get("name") or arch.get("name", arch_path.stem)
        if name in names:
            raise ConfigError(f"{where}.name", f"run name {name!r} is used twice; give each run a name", str(src))
        names.add(name)
        training["runs_dir"], training["run_name"] = str(root), name
        arch["training"] = training
        parse_arch({k: v for k, v in arch.items() if k != "training"}, f"{src}: {where}")  # fail early
        out.append((name, arch, src.parent.resolve()))
    return out


def run_suite(path: str, quiet: bool = False) -> list[dict]:
    from .distributed import from_env

    data = yaml.safe_load(Path(path).read_text())
    main = (from_env() or (0,))[0] == 0  # under torchrun, rank 0 alone prints and writes
    quiet = quiet or not main
    rows = []
    for name, arch_dict, base_dir in plan(path):
        arch = parse_arch({k: v for k, v in arch_dict.items() if k != "training"}, f"{path}: {name}")
        training = arch_dict["training"]
        run_dir = Path(training["runs_dir"]) / name
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if not quiet:
                print(f"[{name}] finished earlier: {run_dir}")
        else:
            if (run_dir / "checkpoints").exists():
                run = prepare(resume=str(run_dir))
            else:
                run = prepare_new(arch, training, {}, f"{path}: {name}", base_dir)
            if not quiet:
                print(f"[{name}] {arch.name}: {run.run_dir}")
            summary = train(run, quiet=quiet)
            summary["params"] = json.loads((run_dir / "meta.json").read_text())["params"]
            if main:
                ckpt_io.write_atomic(summary_path, json.dumps(summary, indent=1))
        rows.append({"name": name, **summary})
    columns = tuple(data.get("compare") or DEFAULT_COLUMNS)
    if main:
        print(markdown_table(rows, columns))
    return rows


def markdown_table(rows: list[dict], columns) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
