"""The folder `import` and `upcycle` write: an architecture YAML and a step-0 checkpoint.

    DIR/arch.yaml                         the graph and a `training:` section starting from the
                                          weights below (training.init_from)
    DIR/checkpoints/step_0000000/         hybridlab's checkpoint (hybridlab/checkpoint.py)
    DIR/tokenizer.json                    when the source has one (training.data uses it)

so `hybridlab eval DIR`, `generate DIR` and `train DIR/arch.yaml` take it as they take a run.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from hybridlab.errors import UserError

CHECKPOINT = "checkpoints/step_0000000"


def prepare_out(out: str | Path) -> Path:
    """--out: a new folder, or an empty one; never one that holds something already."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: {'is a file' if not out.is_dir() else 'is not empty'}; name a new folder")
    return out


@contextmanager
def building(out: Path):
    """Create `out` for writing; if anything fails inside, remove what was written, so a
    failed import or upcycle leaves no half-written folder that looks like a model."""
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if existed:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise


def tokenizer_data(source_tokenizer: Path | None, out: Path) -> str | dict:
    """Copy the source's tokenizer.json into `out` and return the `training.data` that reads
    the embedded corpus through it; without one, byte-level data ("default")."""
    if source_tokenizer is None or not source_tokenizer.is_file():
        return "default"
    shutil.copyfile(source_tokenizer, out / "tokenizer.json")
    return {"text": "default", "tokenizer": "tokenizer.json"}


def write_model_folder(out: Path, arch_dict: dict, training: dict, model, header: str) -> Path:
    """Write DIR/arch.yaml (the mapping as given, with `training`) and the model's weights as
    DIR/checkpoints/step_0000000; returns the arch.yaml path. `arch_dict` must parse to the
    architecture `model` was built from."""
    from hybridlab.checkpoint import save_checkpoint, write_atomic
    from hybridlab.graph import parse_arch

    out.mkdir(parents=True, exist_ok=True)
    arch = parse_arch(arch_dict)
    text = (yaml.safe_dump(arch_dict, sort_keys=False, default_flow_style=None, width=1000)
            + yaml.safe_dump({"training": training}, sort_keys=False, default_flow_style=False))
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.strip().splitlines())
    write_atomic(out / "arch.yaml", comment + text)
    # the checkpoint's config: the normalised graph, and data paths from this folder (as a run's)
    config = {**arch.to_dict(), "training": {**training, "data_base_dir": str(out.resolve())}}
    config_yaml = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=1000)
    save_checkpoint(out / "checkpoints", 0, model, {"step": 0}, config_yaml, keep=1)
    return out / "arch.yaml"
