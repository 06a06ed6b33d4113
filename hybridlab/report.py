"""`hybridlab report RUNS_DIR`: a Markdown comparison of runs, read back from what they logged.

A run is any folder below RUNS_DIR with TensorBoard event files (or, failing that, a
metrics.jsonl). Scalars come from the event files, the last value of each tag (metrics.jsonl
when there are none); the architecture from config.yaml and the parameter count from meta.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from hybridlab.tracking import read_jsonl

DEFAULT_COLUMNS = ("params", "step", "val/loss", "val/ppl", "val/acc", "train/loss", "train/tokens_per_s")


def find_runs(root: Path) -> list[Path]:
    runs = set()
    for f in root.rglob("*"):
        if f.is_file() and (f.name.startswith("events.out.tfevents") or f.name == "metrics.jsonl"):
            runs.add(f.parent)
    # a suite or sweep keeps its own hparams table beside the runs; runs are what has a config
    with_config = {r for r in runs if (r / "config.yaml").exists()}
    return sorted(with_config or runs)


def read_scalars(run_dir: Path) -> tuple[dict, int]:
    """-> ({tag: last value}, last step) from the event files, else from metrics.jsonl."""
    last, step = {}, 0
    if any(run_dir.glob("events.out.tfevents*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for events in sorted(run_dir.glob("events.out.tfevents*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                e = acc.Scalars(tag)[-1]
                if tag not in last or e.step >= last[tag][0]:
                    last[tag] = (e.step, e.value)
        return {k: v for k, (_, v) in last.items()}, training_step(last)
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        step = max(step, row.get("step", 0))
        last.update({k: v for k, v in row.items() if k != "step"})
    return last, step


def training_step(last: dict) -> int:
    """The run's training step: the last step of its train/ scalars. Not the largest step of any
    tag: `hybridlab eval` logs figures against context length (eval/ppl_vs_context at 16384)."""
    train = [s for tag, (s, _) in last.items() if tag.startswith("train/")]
    if train:
        return max(train)
    return max((s for tag, (s, _) in last.items() if not tag.startswith("eval/")), default=0)


def run_row(run_dir: Path, root: Path) -> dict:
    scalars, step = read_scalars(run_dir)
    row = {"run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name, "step": step, **scalars}
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        data = yaml.safe_load(cfg.read_text()) or {}
        row["arch"] = data.get("name", "")
    meta = run_dir / "meta.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        row["params"], row["arch_hash"] = m.get("params"), m.get("arch_hash")
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "-" if v is None else str(v)


def report(runs_dir: str, columns: list[str] | None = None, sort: str | None = None) -> str:
    from .errors import UserError

    root = Path(runs_dir)
    if not root.is_dir():
        raise UserError(f"{runs_dir}: not a folder")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"{runs_dir}: no runs (no TensorBoard event files or metrics.jsonl below it)")
    table = [run_row(r, root) for r in runs]
    if columns is None:
        extra = sorted({k for r in table for k in r if k.startswith("sweep/")})
        columns = [c for c in DEFAULT_COLUMNS if any(c in r for r in table)] + extra
    if sort:
        if not any(sort in r for r in table):
            raise UserError(f"--sort {sort}: no run logged it; columns: {', '.join(sorted({k for r in table for k in r}))}")
        table.sort(key=lambda r: (not isinstance(r.get(sort), (int, float)), r.get(sort, 0)))
    lines = ["| run | arch | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in table:
        lines.append(f"| {r['run']} | {r.get('arch', '-')} | " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
