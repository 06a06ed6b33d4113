"""Where tokens come from: local files, token memmaps, the embedded default corpus, and the
seeded generators that synthetic tasks and random training windows draw from.

Everything here returns a `TokenStream`, a read-only 1-D sequence of token ids made of pieces
(memmapped files or small in-memory arrays). Files are never loaded whole, so a corpus larger
than memory still trains; only the windows a batch needs are read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from hybridlab.errors import UserError

_SNIFF = 8192  # bytes read to decide whether a file is text (binary files contain NUL bytes)


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded by a hash of `parts` (e.g. ("mqar-train", seed, step)).

    Batches are then pure functions of their parts: no iterator state to checkpoint, and streams
    with different names ("...-train" vs "...-eval") never share a seed."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class TokenStream:
    """Concatenation of 1-D integer arrays, indexable by contiguous ranges without copying all."""

    def __init__(self, pieces: list[np.ndarray]):
        self.pieces = [p for p in pieces if len(p)]
        # starts[i] = global offset of piece i; starts[-1] = total length
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as an int64 array, crossing piece boundaries where needed."""
        if len(self.pieces) == 1:
            return np.asarray(self.pieces[0][start:stop], dtype=np.int64)
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo = start - self.starts[i]
            take = min(stop - start, len(self.pieces[i]) - lo)
            out.append(self.pieces[i][lo:lo + take])
            start, i = start + take, i + 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def max(self, chunk: int = 1 << 24) -> int:
        """Largest token id, streamed in chunks (for a token file whose vocab is not given)."""
        return max(int(p[i:i + chunk].max()) for p in self.pieces for i in range(0, len(p), chunk))


def resolve(path: str, base_dir: str | os.PathLike | None) -> Path:
    """A user path, relative to the YAML's folder when one is given (so configs travel)."""
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    return p


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF)


def text_files(path: Path) -> list[Path]:
    """The file itself, or every non-hidden text file under a folder in sorted order."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"data file {path} is empty")
        return [path]
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    files = [f for f in sorted(path.rglob("*"))
             if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
             and f.stat().st_size > 0 and _is_text(f)]
    if not files:
        raise UserError(f"data folder {path} holds no non-empty text files")
    return files


def byte_stream(path: Path) -> TokenStream:
    """Byte-level tokens (vocab 256) of a file or folder, memmapped."""
    return TokenStream([np.memmap(f, dtype=np.uint8, mode="r") for f in text_files(path)])


def token_file(path: Path, dtype: str) -> TokenStream:
    """A flat binary file of token ids (e.g. nanoGPT-style `train.bin`), memmapped."""
    if not path.is_file():
        raise UserError(f"token file {path} does not exist")
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"token file {path} is empty")
    if size % item:
        raise UserError(f"token file {path} has {size} bytes, not a multiple of {item} ({dtype})")
    return TokenStream([np.memmap(path, dtype=dtype, mode="r")])


def default_corpus_text() -> str:
    """CPython's own language reference (`pydoc_data.topics`, ~465 KB of English): always there,
    so examples and tests train on real text with no download. Topics sorted for determinism."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_stream() -> TokenStream:
    return TokenStream([np.frombuffer(default_corpus_text().encode("utf-8"), dtype=np.uint8)])
