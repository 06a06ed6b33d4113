"""Load a trained model back from a checkpoint (or a run folder) for eval and generation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from . import checkpoint as ckpt_io
from .errors import UserError
from .graph import Arch, parse_arch
from .train_config import TrainConfig, parse_training


@dataclass
class Loaded:
    model: object
    arch: Arch
    cfg: TrainConfig
    data_spec: object
    base_dir: Path
    ckpt: Path
    run_dir: Path
    step: int


def load_checkpoint(path: str | Path, device=None, arch_path: str | None = None) -> Loaded:
    import torch

    from .model import HybridLM

    ckpt = ckpt_io.resolve(path)
    manifest = ckpt_io.verify(ckpt)
    cfg_path = ckpt / "config.yaml"
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except (OSError, yaml.YAMLError):
        raise UserError(f"{ckpt}: broken checkpoint: config.yaml unreadable") from None
    arch = parse_arch({k: v for k, v in data.items() if k != "training"}, str(cfg_path))
    if arch_path is not None:
        from .graph import load_arch

        other = load_arch(arch_path)
        if other.arch_hash() != arch.arch_hash():
            raise UserError(f"{ckpt}: checkpoint is of architecture {arch.name} ({arch.arch_hash()}), "
                            f"not of {arch_path} ({other.arch_hash()})")
        arch = other
    training = dict(data.get("training") or {})
    base_dir = Path(training.pop("data_base_dir", ckpt))
    cfg, data_spec = parse_training(training, source=str(cfg_path))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = HybridLM(arch)
    ckpt_io.load_weights(model, ckpt)
    model.to(device).eval()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    return Loaded(model, arch, cfg, data_spec, base_dir, ckpt, run_dir, manifest.get("step", 0))
