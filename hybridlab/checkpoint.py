"""Checkpoints that are never half-written.

A checkpoint is a folder `checkpoints/step_000500/` holding `model.safetensors`, `state.pt`
(optimizer, scheduler, RNG, data position), `config.yaml` and `manifest.json` (size and sha256
of each file). It is written under a temporary name, fsynced, then renamed: a rename is atomic,
so a folder with a final name is complete. `latest` names the newest one, replaced the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def save_checkpoint(ckpt_root: Path, step: int, model, train_state: dict, config_yaml: str,
                    keep: int = 2) -> Path:
    import torch
    from safetensors.torch import save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckpt_root)  # before writing: a disk filled by an earlier try gets its space back
    name = f"step_{step:07d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        manifest = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                    for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except OSError as e:  # disk full, read-only, ...: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{ckpt_root}: could not write checkpoint {name}: {e.strerror or e}") from None
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        trash = ckpt_root / f".trash-{name}-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    write_atomic(ckpt_root / "latest", name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep]:
        # rename first (atomic), then delete: a kill mid-delete leaves only a hidden folder,
        # never a final-named checkpoint with files missing
        trash = ckpt_root / f".trash-{old.name}-{os.getpid()}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    _remove_stale(ckpt_root)
    return final


def _remove_stale(ckpt_root: Path) -> None:
    """Folders and `latest` temporaries left by writers killed earlier (other processes)."""
    for stale in list(ckpt_root.glob(".t*-step_*")) + list(ckpt_root.glob(".latest.tmp-*")):
        if not stale.name.endswith(f"-{os.getpid()}"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


REQUIRED = ("model.safetensors", "state.pt", "config.yaml")  # what every manifest must list


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run folder holds a complete checkpoint (a final-named step folder)."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(p.is_dir() for p in root.glob("step_*"))


def resolve(path: str | Path) -> Path:
    """A run folder, its `checkpoints/` folder, or one checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run folder")
    if (p / MANIFEST).exists() or (p / "model.safetensors").exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    latest = root / "latest"
    if latest.exists():
        name = latest.read_text().strip()
        if (root / name).is_dir():
            return root / name
    steps = sorted(q for q in root.glob("step_*") if q.is_dir())
    if not steps:
        raise UserError(f"{p}: holds no checkpoint (expected checkpoints/step_*/)")
    return steps[-1]


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest; a broken checkpoint gets a clear UserError."""
    mpath = ckpt / MANIFEST
    if not mpath.exists():
        raise UserError(f"{ckpt}: broken checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        raise UserError(f"{ckpt}: broken checkpoint: {MANIFEST} is not readable") from None
    if not isinstance(files, dict):
        raise UserError(f"{ckpt}: broken checkpoint: {MANIFEST} is not readable")
    unlisted = [name for name in REQUIRED if name not in files]
    if unlisted:  # a manifest that lists nothing must not wave tampered files through
        raise UserError(f"{ckpt}: broken checkpoint: {MANIFEST} does not list {unlisted[0]}")
    for name, meta in files.items():
        f = ckpt / name
        if not f.exists():
            raise UserError(f"{ckpt}: broken checkpoint: {name} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise UserError(f"{ckpt}: broken checkpoint: {name} does not match its manifest "
                            "(truncated or modified)")
    return manifest


def load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    except Exception as e:  # shape mismatch or unreadable file
        raise UserError(f"{ckpt}: weights do not fit this architecture: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        what = (f"missing {sorted(missing)[:3]}" if missing else "") + \
               (f" unexpected {sorted(unexpected)[:3]}" if unexpected else "")
        raise UserError(f"{ckpt}: weights are from another architecture ({what.strip()})")


def load_state(ckpt: Path) -> dict:
    import torch

    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{ckpt}: broken checkpoint: state.pt unreadable ({type(e).__name__})") from None
