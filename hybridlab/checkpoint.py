"""Checkpoints that are never half-written.

A checkpoint is a folder `checkpoints/step_000500/` holding `model.safetensors`, `state.pt`
(optimizer, scheduler, RNG, data position), `config.yaml` and `manifest.json` (size and sha256
of each file). It is written under a temporary name, fsynced, then renamed: a rename is atomic,
so a folder with a final name is complete. `latest` names the newest one, replaced the same way.

A run with FSDP2 (training.parallel: fsdp) also writes `dcp/`: weights and optimizer state as
torch Distributed Checkpoint shards, one file per process, which load into any number of
processes (and into one, without torchrun); its `state.pt` then holds no optimizer. Its
`model.safetensors` holds the full weights all the same, so eval and generate read every checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
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


def tmp_name(path: Path) -> Path:
    """Where `path` is written before `publish` renames it into place (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def publish(tmp: Path, path: Path) -> None:
    """fsync, then rename into place: a file with a final name is complete."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = tmp_name(path)
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    publish(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, model, train_state: dict, config_yaml: str,
                    keep: int = 2) -> Path:
    """One process's checkpoint: full weights (safetensors) and `train_state` (state.pt)."""
    from safetensors.torch import save_model

    tmp = begin_checkpoint(ckpt_root, step)

    def write():
        save_model(model, str(tmp / "model.safetensors"))
        _save_state(train_state, tmp)

    return finish_checkpoint(tmp, step, config_yaml, keep, write)


def _save_state(train_state: dict, tmp: Path) -> None:
    import torch

    torch.save(train_state, tmp / "state.pt")


def _name(step: int) -> str:
    return f"step_{step:07d}"


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """The empty temporary folder checkpoint `step` is written into."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(ckpt_root)  # before writing: a disk filled by an earlier try gets its space back
    tmp = ckpt_root / f".tmp-{_name(step)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{ckpt_root}: could not write checkpoint {_name(step)}: {e.strerror or e}") from None
    return tmp


def finish_checkpoint(tmp: Path, step: int, config_yaml: str, keep: int, write=None) -> Path:
    """Write the rest into `tmp` (`write()`, then config.yaml and the manifest of every file in
    it, subfolders included), fsync, and rename it to its final name; prune to `keep`."""
    ckpt_root, name = tmp.parent, _name(step)
    final = ckpt_root / name
    try:
        if write is not None:
            write()
        (tmp / "config.yaml").write_text(config_yaml)
        files = sorted(f for f in tmp.rglob("*") if f.is_file())
        manifest = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                    for f in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        for f in [*files, tmp / MANIFEST]:
            _fsync(f)
        for folder in {f.parent for f in files}:
            _fsync(folder)
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


def save_sharded(ckpt_root: Path, step: int, model, optimizer, train_state: dict, config_yaml: str,
                 keep: int, dist) -> Path:
    """FSDP2's checkpoint, written by every process together (`dist`: hybridlab.distributed.Dist;
    one process without torchrun works too): `dcp/` with every process's shard of the weights and
    optimizer state, then rank 0 adds the full weights, `train_state`, config and manifest and
    renames the folder. A write error on rank 0 is raised on every process."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    tmp, error = None, None
    if dist.main:
        try:
            tmp = begin_checkpoint(ckpt_root, step)
        except UserError as e:
            error = str(e)
    tmp, error = dist.broadcast((tmp, error))  # one folder for every process (a shared file system)
    if error:
        raise UserError(error)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _without_process_group_warning():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = None
    if dist.main:
        unique = _unique_state_keys(model)  # a block shared by several layers: stored once

        def write():
            save_file({k: v.contiguous() for k, v in full.items() if k in unique},
                      str(tmp / "model.safetensors"), metadata={"format": "pt"})
            _save_state(train_state, tmp)

        try:
            final = finish_checkpoint(tmp, step, config_yaml, keep, write)
        except UserError as e:
            error = str(e)
    final, error = dist.broadcast((final, error))
    if error:
        raise UserError(error)
    return final


@contextlib.contextmanager
def _without_process_group_warning():
    """Distributed Checkpoint warns that it runs in one process when there is no process group:
    that is what a one-process run means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _unique_state_keys(model) -> set[str]:
    """State-dict keys with every shared tensor (a block at several layer positions) once."""
    seen, keys = set(), set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            keys.add(key)
    return keys


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint holds its weights and optimizer as Distributed Checkpoint shards."""
    return (Path(ckpt) / "dcp" / ".metadata").exists()


def load_sharded(ckpt: Path, model, optimizer) -> None:
    """Weights and optimizer state from `dcp/` into `model` (plain, or sharded by FSDP2 over
    any number of processes: Distributed Checkpoint reshards) and `optimizer`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _without_process_group_warning():
            dcp.load(state, checkpoint_id=str(Path(ckpt) / "dcp"))
    except Exception as e:  # a shape that does not fit, a missing key, an unreadable shard
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{ckpt}: sharded weights do not load into this model: {first}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_into_sharded(ckpt: Path, model, optimizer, optimizer_state: dict) -> None:
    """A one-process or DDP checkpoint (full weights, optimizer state keyed by parameter
    position) into a model sharded by FSDP2: every process reads the whole and keeps its shard."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    stored = load_file(str(Path(ckpt) / "model.safetensors"))
    by_tensor: dict[int, list[str]] = {}  # a block shared by several layers is stored once
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    weights, aliases = {}, set()
    for keys in by_tensor.values():
        found = [k for k in keys if k in stored]
        if not found:
            raise UserError(f"{ckpt}: weights are from another architecture (missing {keys[0]})")
        weights[keys[0]] = stored[found[0]]  # a shared tensor is set once, under its first name
        aliases.update(keys[1:])
    try:
        result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{ckpt}: weights do not fit this architecture: {str(e).splitlines()[0]}") from None
    if set(result.missing_keys) - aliases or result.unexpected_keys:
        raise UserError(f"{ckpt}: weights are from another architecture")
    # optimizer.state_dict() numbers parameters in param_groups order; the full form names them
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                             for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


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
