"""Tiny search spaces for the sweep tests: a d_model-32 Taipan, a few steps at seq_len 32."""
import os
import subprocess
import sys
from pathlib import Path

import yaml

from runs_helpers import TINY_ARCH

TINY_TRAINING = {"data": "default", "seq_len": 32, "batch_size": 2, "steps": 3, "lr": 3e-3, "warmup_steps": 1,
                 "log_every": 1, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0}


def write_space(tmp_path: Path, name: str = "space.yaml", **over) -> Path:
    """A base architecture (M M M S, d 32) and a search space over it, both in tmp_path."""
    base = tmp_path / "base.yaml"
    if not base.exists():
        base.write_text(yaml.safe_dump({**TINY_ARCH, "pattern": "M M M S"}, sort_keys=False))
    space = {
        "study": "t", "base": "base.yaml", "out_dir": str(tmp_path / "sweeps"),
        "training": dict(TINY_TRAINING), "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        "trials": 3, "workers": 1, "threads": 1, "measure": {"context": 16, "decode_steps": 2},
        "objectives": [{"metric": "val_loss", "direction": "minimize"}, {"metric": "params"}],
        "parameters": {"sal.period": {"type": "int", "low": 1, "high": 3},
                       "sal.capacity": {"type": "float", "low": 0.1, "high": 0.5}},
    }
    for key, value in over.items():
        if value is None:
            space.pop(key, None)
        elif key == "training":
            space["training"] = {**space["training"], **value}
        else:
            space[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def load(space_path: Path, storage: str | None = None):
    """The study (and its space) as a sweep over `space_path` left it."""
    from hybridlab.sweep.space import load_space
    from hybridlab.sweep.study import open_storage, storage_spec

    import optuna

    space = load_space(space_path)
    storage = open_storage(storage_spec(space, storage))
    return optuna.load_study(study_name=space.study, storage=storage), space


def sweep_cmd(space_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "hybridlab", "sweep", str(space_path), *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), e.get("PYTHONPATH", "")])
    return e


def run(cmd, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())
