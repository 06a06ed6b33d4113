"""`data: {prepared: DIR}`: the token shards `hybridlab data prepare` wrote, memory-mapped.

The shards are one token stream (nothing is tokenized, nor read whole, at start), split once at a
document boundary: training is the stream before the last documents, validation those documents
(about `val_fraction` of the tokens). Batches are TextDataset's: windows at random offsets seeded
by (seed, step), fixed consecutive validation windows. The `_packed` variants add `seq_idx`, the
ordinal of each input token's document within its row, read from the document index, for models
that keep the documents of a packed row apart.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from hybridlab.config import Config, field
from hybridlab.data import corpus
from hybridlab.data.prepare import TOKENIZER, read_manifest
from hybridlab.data.text import ByteCodec, TextDataset, TokenizerCodec
from hybridlab.errors import UserError


@dataclass(frozen=True)
class PreparedConfig(Config):
    """`data: {prepared: DIR, val_fraction: 0.01}`."""

    block_name = "prepared data"
    prepared: str = field("", "folder written by `hybridlab data prepare`")
    val_fraction: float = field(0.01, "share of the tokens held out: whole documents from the end",
                                gt=0, lt=1)
    seq_len: Optional[int] = field(None, "tokens per example (null: the training seq_len)",
                                   ge=1, nullable=True)


_OPEN_INDEXES = 16  # document indexes kept memory-mapped: a thousand shards need not hold 2000 files open


class PreparedDataset(TextDataset):
    """TextDataset over memory-mapped shards, with a document-boundary split and `seq_idx`."""

    def __init__(self, folder: Path, manifest: dict, seq_len: int, val_fraction: float):
        # TextDataset.__init__ is not called: it splits at a token count, this at a document start.
        self.folder, self.seq_len, self.vocab_size = folder, seq_len, int(manifest["vocab_size"])
        self.name = f"prepared:{folder}"
        self.codec = self._codec(manifest)
        dtype = np.dtype(manifest["dtype"])
        pieces, self.index_files, self._open = [], [], {}
        for shard in manifest["shards"]:
            path = folder / shard["tokens_file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                                f"{shard['tokens']} {dtype.name} tokens; prepare the folder again")
            index = folder / shard["doc_starts_file"]
            if not index.is_file():
                raise UserError(f"{index}: missing; prepare the folder again")
            pieces.append(np.memmap(path, dtype=dtype, mode="r"))
            self.index_files.append(str(index))
        self.stream = corpus.TokenStream(pieces)
        # shard_starts[k], doc_counts[k]: tokens and documents before shard k (last: the totals)
        self.shard_starts = np.cumsum([0] + [s["tokens"] for s in manifest["shards"]])
        self.doc_counts = np.cumsum([0] + [s["documents"] for s in manifest["shards"]])
        self.n_train = self._split(val_fraction)
        self.n_val = len(self.stream) - self.n_train
        for split, count in (("training", self.n_train), ("validation", self.n_val)):
            if count < seq_len + 1:
                raise UserError(f"{folder}: the {split} split has {count} tokens, fewer than seq_len + 1 "
                                f"= {seq_len + 1}; use more text, a shorter seq_len or another val_fraction")

    def _codec(self, manifest: dict):
        record = manifest.get("tokenizer")
        if record is None:
            return ByteCodec()
        path = self.folder / TOKENIZER
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            raise UserError(f"{path}: missing or not the tokenizer the data was prepared with "
                            f"(sha256 {record['sha256'][:12]}); prepare the folder again")
        return TokenizerCodec(path)

    # ---- the document index ----

    def _index(self, k: int) -> np.ndarray:
        """Shard k's document starts (memory-mapped; the least recently used closed past a few)."""
        starts = self._open.pop(k, None)
        if starts is None:
            starts = np.load(self.index_files[k], mmap_mode="r")
            if len(starts) != self.doc_counts[k + 1] - self.doc_counts[k]:
                raise UserError(f"{self.index_files[k]}: {len(starts)} documents, the manifest says "
                                f"{self.doc_counts[k + 1] - self.doc_counts[k]}; prepare the folder again")
        self._open[k] = starts  # dicts keep insertion order: the first key is the least recent
        if len(self._open) > _OPEN_INDEXES:
            del self._open[next(iter(self._open))]
        return starts

    def _by_shard(self, values, shard_bounds: np.ndarray, lookup) -> np.ndarray:
        """lookup(k, values of shard k) for each shard the values fall in, shard k holding the
        values in [shard_bounds[k], shard_bounds[k + 1]) (token positions or document ordinals)."""
        values = np.asarray(values, dtype=np.int64)
        shard = np.searchsorted(shard_bounds, values, side="right") - 1
        out = np.empty_like(values)
        for k in np.unique(shard):
            here = shard == k
            out[here] = lookup(k, values[here])
        return out

    def documents_at(self, positions: np.ndarray) -> np.ndarray:
        """Ordinal (over the whole stream) of the document holding each token position."""
        def in_shard(k, p):
            return self.doc_counts[k] + np.searchsorted(self._index(k), p - self.shard_starts[k], side="right") - 1
        return self._by_shard(positions, self.shard_starts, in_shard)

    def document_start(self, d: int) -> int:
        """Stream offset of document `d`'s first token."""
        return int(self.document_starts(np.array([d]))[0])

    def document_starts(self, docs: np.ndarray) -> np.ndarray:
        """Stream offsets of the documents `docs` (ordinals over the whole stream)."""
        def in_shard(k, d):
            return self.shard_starts[k] + self._index(k)[d - self.doc_counts[k]]
        return self._by_shard(docs, self.doc_counts, in_shard)

    def _split(self, val_fraction: float) -> int:
        """The document start nearest to holding out `val_fraction` of the tokens (never 0 or all)."""
        n, docs = len(self.stream), int(self.doc_counts[-1])
        if docs < 2:
            raise UserError(f"{self.folder} holds {docs} document; a held-out split of whole documents "
                            "needs at least two")
        target = n - int(n * val_fraction)
        d = int(self.documents_at(np.array([min(target, n - 1)]))[0])
        candidates = [s for s in (self.document_start(d), self.document_start(d + 1) if d + 1 < docs else n)
                      if 0 < s < n]
        return min(candidates, key=lambda s: abs(s - target))

    def _seq_idx(self, starts: list[int]) -> torch.Tensor:
        """(B, L) int32: each input token's document, counted from the row's first (0).
        From the documents that start inside each row, not a lookup per token: on the data
        loader's critical path (the step waits for it), a per-token search of a 0.5M-token
        step cost 44 ms on a 2-core CPU."""
        starts = np.asarray(starts, dtype=np.int64)
        first = self.documents_at(starts)
        n_new = self.documents_at(starts + self.seq_len - 1) - first  # documents starting in each row
        rows = np.repeat(np.arange(len(starts)), n_new)
        # the k-th new document of row r is first[r] + 1 + k
        k = np.arange(n_new.sum()) - np.repeat(np.cumsum(n_new) - n_new, n_new)
        cols = self.document_starts(first[rows] + 1 + k) - starts[rows]
        marks = np.zeros((len(starts), self.seq_len), dtype=np.int32)
        marks[rows, cols] = 1
        return torch.from_numpy(np.cumsum(marks, axis=1, dtype=np.int32))

    # ---- batches: TextDataset's, with the starts shared by the packed variants ----

    def _train_starts(self, step: int, batch_size: int, seed: int) -> list[int]:
        g = corpus.generator("text-train", seed, step)
        return torch.randint(0, self.n_train - self.seq_len, (batch_size,), generator=g).tolist()

    def _eval_starts(self) -> list[int]:
        L = self.seq_len
        return [self.n_train + i * L for i in range((self.n_val - 1) // L)]

    def train_batch(self, step: int, batch_size: int, seed: int):
        return self._batch(self._train_starts(step, batch_size, seed))

    def train_batch_packed(self, step: int, batch_size: int, seed: int):
        """(inputs, targets, seq_idx): train_batch's pair and each input token's document."""
        starts = self._train_starts(step, batch_size, seed)
        return (*self._batch(starts), self._seq_idx(starts))

    def _eval_rows(self, batch_size: int, max_batches: int | None) -> Iterator[list[int]]:
        starts = self._eval_starts()
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield starts[i:i + batch_size]

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator:
        """Consecutive windows of the validation documents; each token is predicted once."""
        for starts in self._eval_rows(batch_size, max_batches):
            yield self._batch(starts)

    def eval_batches_packed(self, batch_size: int, max_batches: int | None = None) -> Iterator:
        """eval_batches' pairs with their seq_idx."""
        for starts in self._eval_rows(batch_size, max_batches):
            yield (*self._batch(starts), self._seq_idx(starts))


def from_prepared(cfg: PreparedConfig, seq_len: int, base_dir=None) -> PreparedDataset:
    folder = corpus.resolve(cfg.prepared, base_dir)
    return PreparedDataset(folder, read_manifest(folder), seq_len, cfg.val_fraction)
