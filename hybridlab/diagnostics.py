"""What the blocks report about themselves, gathered through their hooks (blocks/base.py) and
never by block type: each layer position's eval report (metrics, histograms, warnings), the
training summary's block metrics, and how they read for people."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybridlab.blocks.base import TokenRecord


@dataclass
class Diagnostics:
    scalars: dict[str, float] = field(default_factory=dict)  # blocks/<scope>/<name>, val/<name>
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)  # blocks/<scope>/<name>
    warnings: list[str] = field(default_factory=list)


def block_reports(model, records: dict[str, TokenRecord]) -> Diagnostics:
    """Ask each block that recorded (scope -> TokenRecord) for its eval report; a name a block
    puts in `means` becomes val/<name>, averaged over the layer positions reporting it."""
    blocks = dict(zip(model.scopes, model.layers))
    out, means = Diagnostics(), {}
    for scope, record in records.items():
        report = blocks[scope].eval_report(scope, record)
        out.scalars.update({f"blocks/{scope}/{k}": v for k, v in report.scalars.items()})
        out.histograms.update({f"blocks/{scope}/{k}": v for k, v in report.histograms.items()})
        out.warnings.extend(report.warnings)
        for name, value in report.means.items():
            means.setdefault(name, []).append(value)
    out.scalars.update({f"val/{name}": sum(v) / len(v) for name, v in means.items()})
    return out


def print_warnings(lines: list[str], prefix: str = "", stream=None) -> None:
    """One line per warning on stderr (no traceback): `[prefix ]warning: ...`."""
    stream = stream or sys.stderr
    for line in lines:
        stream.write(f"{prefix}warning: {line}\n")
    stream.flush()


def summary_labels() -> dict[str, str]:
    """Aux metric name -> progress-bar label, over every registered block type."""
    from hybridlab.blocks import REGISTRY

    out: dict[str, str] = {}
    for spec in REGISTRY.values():
        out.update(spec.module_cls.summary_metrics)
    return out


def training_summary(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The block metrics of a training step's aux (`layers.6.sal/selected_frac`) that block types
    summarise, each averaged over the layer positions reporting it; NaN where none does, so
    every run's summary has the same keys."""
    out = {}
    for name in summary_labels():
        values = [v.item() for k, v in metrics.items() if k.rsplit("/", 1)[-1] == name]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def progress_text(summary: dict[str, float]) -> str:
    """`sel 0.150` for the progress bar (labels from the block types; NaNs left out)."""
    labels = summary_labels()
    return " ".join(f"{labels[k]} {v:.3f}" for k, v in summary.items() if k in labels and math.isfinite(v))


def last_training_block_metrics(run_dir: Path, step: int, scopes: list[str]) -> tuple[int | None, dict]:
    """The block metrics of the last training step logged at or before `step` in the run's
    metrics.jsonl: (that step, {scope: {name: value}}); (None, {}) when none was logged."""
    from hybridlab.tracking import read_jsonl

    last_step, last = None, {}
    for row in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        if "train/loss" in row and row.get("step", 0) <= step:
            last_step, last = row["step"], row
    out: dict[str, dict] = {}
    for scope in scopes:
        head = f"blocks/{scope}/"
        found = {k[len(head):]: v for k, v in last.items() if k.startswith(head) and "/" not in k[len(head):]}
        if found:
            out[scope] = found
    return last_step, out


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _split(scope: str, scalars: dict) -> tuple[dict, dict]:
    """A scope's blocks/<scope>/<name> scalars: (its eval metrics, its turned-off-alone ones)."""
    head = f"blocks/{scope}/"
    mine = {k[len(head):]: v for k, v in scalars.items() if k.startswith(head)}
    off = {k[:-len("_off")]: v for k, v in mine.items() if k.endswith("_off")}
    return {k: v for k, v in mine.items() if not k.endswith("_off")}, off


def histogram_summary(values: torch.Tensor, bins: int = 10) -> dict:
    """A distribution in a few numbers (for eval.json and the printout): quantiles, and counts
    in `bins` equal bins between its min and max."""
    v = values.detach().float().flatten().cpu()
    if not v.numel():
        return {}
    q10, median, q90 = np.quantile(v.numpy(), [0.1, 0.5, 0.9])  # (torch.quantile stops at 2^24 values)
    lo, hi = v.min().item(), v.max().item()
    counts = torch.histc(v, bins=bins, min=lo, max=hi) if hi > lo else torch.tensor([float(v.numel())])
    return {"min": lo, "q10": float(q10), "median": float(median), "q90": float(q90), "max": hi,
            "counts": [int(c) for c in counts.tolist()]}


def block_results(scopes: list[str], scalars: dict, histograms: dict, trained: dict,
                  trained_step: int | None) -> dict:
    """For eval.json: per layer position that reported anything, {"training": last logged
    training metrics, "training_step", "validation": its eval metrics, "histograms": each of its
    histograms summarised, "off_alone": validation with it turned off alone}."""
    out = {}
    for scope in scopes:
        evals, off = _split(scope, scalars)
        head = f"blocks/{scope}/"
        hists = {k[len(head):]: histogram_summary(v) for k, v in histograms.items() if k.startswith(head)}
        entry = {"training": trained[scope], "training_step": trained_step} if scope in trained else {}
        entry.update({k: v for k, v in (("validation", evals), ("histograms", hists), ("off_alone", off)) if v})
        if entry:
            out[scope] = entry
    return out


def block_lines(results: dict) -> list[str]:
    """`block_results` as lines for people."""
    lines = []
    for scope, entry in results.items():
        lines.append(f"  {scope}")
        if "training" in entry:
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in entry["training"].items())
            lines.append(f"    training (step {entry['training_step']}): {shown}")
        if "validation" in entry:
            lines.append("    validation: " + ", ".join(f"{k} {_fmt(v)}" for k, v in entry["validation"].items()))
        for name, h in entry.get("histograms", {}).items():
            lines.append(f"    validation {name}: min {h['min']:.3f}, 10% {h['q10']:.3f}, median "
                         f"{h['median']:.3f}, 90% {h['q90']:.3f}, max {h['max']:.3f}")
        if "off_alone" in entry:
            lines.append("    validation, turned off alone: "
                         + ", ".join(f"{k} {_fmt(v)}" for k, v in entry["off_alone"].items()))
    return lines
