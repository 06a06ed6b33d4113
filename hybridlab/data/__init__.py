"""Data for training and evaluation: synthetic tasks and text, behind one small interface.

    ds = make_dataset(spec, seq_len, path="data", base_dir=None)

`spec` is the YAML `data:` value: "default" (CPython's docs, byte-level, no download), a task
name, or a mapping with exactly one of `task:`, `text:`, `tokens:` or `prepared:` (a folder from
`hybridlab data prepare`). Batches are pure functions of (step, batch_size, seed), so exact resume
needs no data-loader state.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

import torch

from hybridlab.config import ConfigError, join_path, suggest
from hybridlab.data.prepared import PreparedConfig, PreparedDataset, from_prepared
from hybridlab.data.tasks import TASKS, TaskDataset, TaskSpec, make_task, register_task
from hybridlab.data.text import TextConfig, TextDataset, TokensConfig, from_text, from_tokens
from hybridlab.errors import UserError

__all__ = ["Dataset", "PreparedDataset", "TASKS", "TaskDataset", "TaskSpec", "TextDataset",
           "make_dataset", "register_task"]

_SOURCES = ("task", "text", "tokens", "prepared")


@runtime_checkable
class Dataset(Protocol):
    """What the trainer and evaluator use. Targets are -100 where no loss applies."""

    kind: str          # "task" or "text"
    name: str
    vocab_size: int    # the model's vocab must be >= this
    seq_len: int

    def train_batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, L) int64; a pure function of its arguments."""

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator:
        """The fixed held-out set, disjoint from training, identical on every call."""

    def eval_groups(self) -> dict[str, Callable[..., Iterator]]:
        """Named held-out sets (task difficulty levels; text: {"val": eval_batches})."""

    def long_sequences(self, length: int, n: int) -> torch.Tensor:
        """(n, length+1) held-out token streams at any length."""

    def long_examples(self, length: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (n, length): long_sequences with the loss mask."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def make_dataset(spec: Any, seq_len: int, path: str = "data", base_dir=None) -> Dataset:
    """Build the dataset a YAML `data:` value describes; errors name `path` (e.g. data.task)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(spec, str):
        if spec == "default":
            spec = {"text": "default"}
        elif spec in TASKS:
            spec = {"task": spec}
        else:
            raise ConfigError(path, f"unknown data {spec!r}{suggest(spec, ['default', *TASKS])}; use "
                              "'default', a task name or a mapping with task:, text:, tokens: or prepared:")
    if not isinstance(spec, Mapping):
        raise ConfigError(path, "must be 'default', a task name or a mapping with task:, text:, "
                          f"tokens: or prepared:, got {type(spec).__name__}")
    given = [k for k in _SOURCES if k in spec]
    if len(given) != 1:
        if given:
            raise ConfigError(path, f"give one of task:, text:, tokens:, not {' and '.join(given)}")
        for key in spec:
            hint = suggest(str(key), _SOURCES)
            if hint:
                raise ConfigError(join_path(path, str(key)), f"unknown key{hint}")
        raise ConfigError(path, "needs one of task:, text:, tokens: or prepared:")
    if given[0] == "task":
        return make_task(spec, seq_len, path)
    config, build = {"text": (TextConfig, from_text), "tokens": (TokensConfig, from_tokens),
                     "prepared": (PreparedConfig, from_prepared)}[given[0]]
    cfg = config.from_dict(spec, 0, path, cross_check=False)
    if not getattr(cfg, given[0]).strip():
        raise ConfigError(join_path(path, given[0]), "must name a file or folder, got ''")
    return build(cfg, cfg.seq_len or seq_len, base_dir)
