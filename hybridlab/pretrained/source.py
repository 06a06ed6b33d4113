"""A pretrained model's folder on disk: its config.json and its weights, read lazily.

Weights come from safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) or PyTorch pickles (`pytorch_model.bin` or its sharded index),
read with `weights_only=True`. Nothing is downloaded: the folder must be local.
"""
from __future__ import annotations

import json
from pathlib import Path

from hybridlab.errors import UserError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def model_folder(path: str | Path) -> Path:
    """The folder itself; a clear error when it is missing or a file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such folder (expected a local model folder with config.json)")
    if not p.is_dir():
        raise UserError(f"{p}: not a folder (expected a local model folder with config.json)")
    return p


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json (expected a Hugging Face or mamba_ssm model folder)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: must hold a JSON object, got {type(config).__name__}")
    return config


class Weights:
    """Tensors of a model folder by name; `take` names a missing key in its error, and
    `unused` lists what the mapping never took (weights a format we do not read would need)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        self._taken: set[str] = set()
        if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS).is_file():
            self.kind = "safetensors"
            files = self._index(SAFETENSORS_INDEX) or [folder / SAFETENSORS]
        elif (folder / PICKLE_INDEX).is_file() or (folder / PICKLE).is_file():
            self.kind = "pickle"
            files = self._index(PICKLE_INDEX) or [folder / PICKLE]
        else:
            raise UserError(f"{folder}: no weights (expected {SAFETENSORS}, {PICKLE} or a sharded index)")
        for f in files:
            for name in self._names(f):
                self._files[name] = f

    def _index(self, name: str) -> list[Path] | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a weight index (expected a weight_map)") from None
        return [self.folder / f for f in dict.fromkeys(weight_map.values())]

    def _load(self, f: Path, framework: str = "pt"):
        """An open file: safetensors' handle (framework "numpy" lists names and shapes without
        importing torch), or a pickle's state dict, memory-mapped."""
        key = (f, framework if self.kind == "safetensors" else "pt")
        if key not in self._open:
            if not f.is_file():
                raise UserError(f"{f}: weight file missing")
            try:
                if self.kind == "safetensors":
                    from safetensors import safe_open

                    self._open[key] = safe_open(str(f), framework=framework)
                else:
                    import torch

                    self._open[key] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # truncated or not a weight file at all
                raise UserError(f"{f}: unreadable weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return self._open[key]

    def _names(self, f: Path) -> list[str]:
        return list(self._load(f, "numpy").keys())

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def keys(self) -> list[str]:
        return list(self._files)

    def require(self, names) -> None:
        """Every name present, checked before any tensor is read."""
        for name in names:
            if name not in self._files:
                raise UserError(f"{self.folder}: weight {name!r} is missing")

    def take(self, name: str):
        if name not in self._files:
            raise UserError(f"{self.folder}: weight {name!r} is missing")
        self._taken.add(name)
        handle = self._load(self._files[name])
        return handle.get_tensor(name) if self.kind == "safetensors" else handle[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._files:
            raise UserError(f"{self.folder}: weight {name!r} is missing")
        handle = self._load(self._files[name], "numpy")
        if self.kind == "safetensors":
            return tuple(handle.get_slice(name).get_shape())
        return tuple(handle[name].shape)

    def unused(self) -> list[str]:
        return [n for n in self._files if n not in self._taken]
