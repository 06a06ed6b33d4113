"""One TensorBoard run folder per run: scalars, histograms, hparams with the same keys for every
run, and the run's provenance (normalised config, architecture hash, git commit, versions, hardware).

The HParams dashboard takes its columns from one run, so every run logs exactly `hparam_keys()`
and `metric_keys()`; a value that does not apply is 0 / "" for hparams and NaN for metrics. Block
types add their own columns through hooks (blocks/base.py, Block.hparams and hparam_metrics),
asked of every registered type, present in the architecture or not.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

CORE_HPARAM_KEYS = ("arch", "arch_hash", "pattern", "d_model", "n_layers", "params", "data", "seq_len",
                    "batch_size", "steps", "lr", "weight_decay", "seed")
CORE_METRIC_KEYS = ("hparam/val_loss", "hparam/val_ppl", "hparam/recall_acc", "hparam/train_loss",
                    "hparam/tokens_per_s", "hparam/decode_ms", "hparam/prefill_tokens_per_s")


def block_hparams(arch) -> dict:
    """Every registered block type's HParams columns for `arch` (neutral where it has none)."""
    from hybridlab.blocks import REGISTRY

    out: dict = {}
    for spec in REGISTRY.values():
        configs = [layer.config for layer in arch.layers if layer.block == spec.name]
        cols = spec.module_cls.hparams(configs)
        clash = (set(cols) & set(out)) | (set(cols) & set(CORE_HPARAM_KEYS))
        if clash:  # one dashboard column cannot mean two things
            raise ValueError(f"block {spec.name!r} reuses hparam keys {sorted(clash)}")
        out.update(cols)
    return out


def block_metric_keys() -> dict[str, str]:
    """HParams metrics the block types add: {"hparam/eval_<name>": "val/<name>"}."""
    from hybridlab.blocks import REGISTRY

    return {f"hparam/eval_{name}": f"val/{name}"
            for spec in REGISTRY.values() for name in spec.module_cls.hparam_metrics}


def hparam_keys() -> tuple[str, ...]:
    from hybridlab.blocks import REGISTRY

    keys = [k for spec in REGISTRY.values() for k in spec.module_cls.hparams([])]
    return CORE_HPARAM_KEYS + tuple(keys)


def metric_keys() -> tuple[str, ...]:
    return CORE_METRIC_KEYS + tuple(block_metric_keys())


def hparams_for(arch, cfg, data_name: str, n_params: int) -> dict:
    return {
        "arch": arch.name, "arch_hash": arch.arch_hash(), "pattern": arch.pattern(),
        "d_model": arch.d_model, "n_layers": len(arch.layers), "params": n_params,
        **block_hparams(arch),
        "data": data_name, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
        "steps": cfg.total_steps(), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
    }


def provenance() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        info["git_commit"] = commit.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip()) if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order. A line without its newline was cut (by a
    SIGKILL, or it is being written while we read) and is left out, as is any line that does
    not parse, so a reader never fails on a run that was killed or is still going."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().split("\n")[:-1]:  # the last piece is "" or a cut line
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class Tracker:
    """Scalars to TensorBoard and to `metrics.jsonl` (read by tests and reports)."""

    def __init__(self, run_dir: Path, hparams: dict | None = None, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run drops what a killed run logged after its last checkpoint (step N): the
        # events at N itself came before the checkpoint was written, so they stay.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        if purge is not None:
            self._truncate_jsonl(purge)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if hparams is not None and resume_step is None:
            self._write_hparams(hparams)

    def _truncate_jsonl(self, purge: int) -> None:
        """Keep the rows logged before step `purge`, so a resumed run has one row per step."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [row for row in read_jsonl(path) if row.get("step", 0) < purge]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
        os.replace(tmp, path)

    def _write_hparams(self, hparams: dict) -> None:
        from torch.utils.tensorboard.summary import hparams as hp_summary

        keys = hparam_keys()
        assert set(hparams) == set(keys), sorted(set(hparams) ^ set(keys))
        # The HParams dashboard ticks the first 5 columns it is given: lead with what tells
        # architectures apart (the pattern, then the blocks' own settings), not the run's name.
        lead = ("pattern",) + keys[len(CORE_HPARAM_KEYS):]
        ordered = {k: hparams[k] for k in lead + tuple(k for k in keys if k not in lead)}
        exp, ssi, sei = hp_summary(ordered, {k: math.nan for k in metric_keys()})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict) -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def histogram(self, tag: str, values, step: int) -> None:
        """A distribution (any shape, flattened) at `step`: TensorBoard's Histograms tab."""
        import torch

        values = torch.as_tensor(values).detach().float().flatten().cpu()
        if values.numel():
            self.writer.add_histogram(tag, values, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text.replace("\n", "  \n"))

    def image(self, tag: str, png_path: Path, step: int = 0) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(png_path).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
