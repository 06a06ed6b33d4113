"""Tiny runs for tests: a small Taipan and a training section that takes seconds on a CPU."""
from pathlib import Path

import yaml

TINY_ARCH = {
    "name": "tiny", "d_model": 32, "vocab_size": 256,
    "defaults": {"mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
                 "sal": {"head_dim": 8, "window": 16}},
    "pattern": "M M S",
}


def write_arch(tmp_path: Path, runs_dir: Path, **training) -> Path:
    section = {"data": "default", "seq_len": 32, "batch_size": 4, "steps": 12, "lr": 3e-3,
               "warmup_steps": 2, "log_every": 1, "eval_every": 6, "eval_batches": 2,
               "checkpoint_every": 4, "runs_dir": str(runs_dir)}
    section.update(training)
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({**TINY_ARCH, "training": section}, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> merged scalars from metrics.jsonl (later lines win, as after a resume)."""
    from hybridlab.tracking import read_jsonl

    out: dict[int, dict] = {}
    for row in read_jsonl(Path(run_dir) / "metrics.jsonl"):
        out.setdefault(row["step"], {}).update(row)
    return out
