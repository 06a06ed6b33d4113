"""Text datasets: byte-level files, token memmaps, local tokenizers and the embedded default.

A text dataset is one token stream split once into train (the first part) and validation (the
last `val_fraction`). Training windows are drawn at random offsets from a generator seeded by
(seed, step), so a resumed run sees exactly the batches it would have seen; validation is cut into
fixed consecutive windows, so every evaluation scores the same tokens.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from hybridlab.config import Config, field
from hybridlab.data import corpus
from hybridlab.errors import UserError


@dataclass(frozen=True)
class TextConfig(Config):
    """`data: {text: path|default, tokenizer: tokenizer.json}`."""

    block_name = "text data"
    text: str = field("default", "a text file, a folder of text files, or 'default' (CPython docs)")
    tokenizer: Optional[str] = field(None, "HF tokenizer.json (null: bytes, vocab 256)", nullable=True)
    val_fraction: float = field(0.1, "share of the stream, from the end, held out", gt=0, lt=1)
    seq_len: Optional[int] = field(None, "tokens per example (null: the training seq_len)",
                                   ge=1, nullable=True)


@dataclass(frozen=True)
class TokensConfig(Config):
    """`data: {tokens: train.bin, dtype: uint16, vocab_size: 50304}`."""

    block_name = "token-file data"
    tokens: str = field("", "flat binary file of token ids")
    dtype: str = field("uint16", "integer type of the ids in the file", choices=("uint16", "uint32"))
    vocab_size: Optional[int] = field(None, "ids are < this (null: scan the file for the largest)",
                                      ge=1, nullable=True)
    tokenizer: Optional[str] = field(None, "HF tokenizer.json for encode/decode", nullable=True)
    val_fraction: float = field(0.1, "share of the stream, from the end, held out", gt=0, lt=1)
    seq_len: Optional[int] = field(None, "tokens per example (null: the training seq_len)",
                                   ge=1, nullable=True)


class ByteCodec:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TokenizerCodec:
    """A HF `tokenizers` tokenizer.json read from disk; never downloaded."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"reading tokenizer {path} needs the 'tokenizers' package: "
                            "pip install 'hybridlab[text]'") from None
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise UserError(f"cannot read tokenizer {path}: {e}") from None
        self.vocab_size = int(self.tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


class TextDataset:
    kind = "text"

    def __init__(self, name: str, stream: corpus.TokenStream, vocab_size: int, seq_len: int,
                 val_fraction: float, codec=None, source: str = ""):
        self.name, self.stream, self.vocab_size, self.seq_len = name, stream, vocab_size, seq_len
        self.codec = codec
        n = len(stream)
        self.n_val = int(n * val_fraction)
        self.n_train = n - self.n_val
        need = seq_len + 1
        for split, count in (("training", self.n_train), ("validation", self.n_val)):
            if count < need:
                raise UserError(f"{source or name}: the {split} split has {count} tokens, fewer than "
                                f"seq_len + 1 = {need}; use more text, a shorter seq_len or another "
                                "val_fraction")

    def _batch(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        x = torch.from_numpy(np.stack([self.stream.slice(s, s + L + 1) for s in starts]))  # (B, L+1)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def train_batch(self, step: int, batch_size: int, seed: int):
        g = corpus.generator("text-train", seed, step)
        starts = torch.randint(0, self.n_train - self.seq_len, (batch_size,), generator=g)
        return self._batch(starts.tolist())

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator:
        """Consecutive windows of the validation split; each token is predicted once."""
        L = self.seq_len
        starts = [self.n_train + i * L for i in range((self.n_val - 1) // L)]
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self._batch(starts[i:i + batch_size])

    def eval_groups(self) -> dict[str, Callable]:
        return {"val": self.eval_batches}

    def _val_window(self, start: int, m: int) -> np.ndarray:
        """m validation tokens from `start`, wrapping round to the split's beginning."""
        out = []
        while m > 0:
            take = min(m, self.n_val - start)
            out.append(self.stream.slice(self.n_train + start, self.n_train + start + take))
            start, m = 0, m - take
        return np.concatenate(out)

    def long_sequences(self, length: int, n: int) -> torch.Tensor:
        """(n, length+1) validation windows, for perplexity against context length.

        Disjoint windows when the split is long enough; otherwise evenly spaced starts with
        wrap-around. Wrapped text repeats, which lets a model copy: a warning says so."""
        if length < 1 or n < 1:
            raise UserError(f"long_sequences needs length >= 1 and n >= 1, got {length}, {n}")
        m = length + 1
        if n * m <= self.n_val:
            starts = [i * m for i in range(n)]
        else:
            warnings.warn(f"{self.name}: validation split has {self.n_val} tokens, fewer than "
                          f"{n} x {m}; windows overlap or wrap round (repeated text)", stacklevel=2)
            starts = [i * self.n_val // n for i in range(n)]
        return torch.from_numpy(np.stack([self._val_window(s, m) for s in starts]))

    def long_examples(self, length: int, n: int):
        """(inputs, targets), each (n, length): `long_sequences` shifted by one."""
        x = self.long_sequences(length, n)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def encode(self, text: str) -> list[int]:
        if self.codec is None:
            raise UserError(f"{self.name} has no text encoding; add `tokenizer: tokenizer.json`")
        return self.codec.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.codec is None:
            raise UserError(f"{self.name} has no text encoding; add `tokenizer: tokenizer.json`")
        return self.codec.decode(ids)


def from_text(cfg: TextConfig, seq_len: int, base_dir=None) -> TextDataset:
    if cfg.text == "default":
        path, name = None, "default"
        stream = corpus.default_stream()
    else:
        path = corpus.resolve(cfg.text, base_dir)
        name = f"text:{path}"
        stream = corpus.byte_stream(path)
    if cfg.tokenizer is None:
        codec = ByteCodec()
    else:
        codec = TokenizerCodec(corpus.resolve(cfg.tokenizer, base_dir))
        # A tokenizer needs the whole text at once: encode it in memory, file by file.
        texts = ([corpus.default_corpus_text()] if path is None else
                 [f.read_text("utf-8", errors="replace") for f in corpus.text_files(path)])
        ids = np.concatenate([np.asarray(codec.encode(t), dtype=np.uint32) for t in texts])
        stream = corpus.TokenStream([ids])
        name = f"{name}+{cfg.tokenizer}"
    return TextDataset(name, stream, codec.vocab_size, seq_len, cfg.val_fraction, codec,
                       source=str(path or "default corpus"))


def from_tokens(cfg: TokensConfig, seq_len: int, base_dir=None) -> TextDataset:
    path = corpus.resolve(cfg.tokens, base_dir)
    stream = corpus.token_file(path, cfg.dtype)
    codec = TokenizerCodec(corpus.resolve(cfg.tokenizer, base_dir)) if cfg.tokenizer else None
    vocab = cfg.vocab_size or (codec.vocab_size if codec else stream.max() + 1)
    # Cheap sanity check on the head of the file: a wrong dtype shows up as ids past the vocab.
    head = stream.slice(0, min(len(stream), 1 << 20))
    if head.size and int(head.max()) >= vocab:
        raise UserError(f"token file {path} holds id {int(head.max())} >= vocab_size {vocab}; "
                        f"wrong dtype ({cfg.dtype}) or vocab_size?")
    return TextDataset(f"tokens:{path}", stream, vocab, seq_len, cfg.val_fraction, codec,
                       source=str(path))
