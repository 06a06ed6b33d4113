"""Synthetic tasks that tell sequence mixers apart in minutes (zoology / MAD style).

Each task is a frozen config (its YAML knobs) plus a vectorised generator

    generate(cfg, L, B, g) -> (x (B, L+1) token stream, answer (B, L+1) bool)

where `answer[b, t]` marks tokens the model must predict from x[b, :t]. The dataset turns that
into next-token pairs, inputs = x[:, :-1], targets = x[:, 1:] with -100 off the answers, so every
task is trained and scored exactly like text, and the stream itself stays a valid token sequence
(which is what `long_sequences` returns). Generators draw only from the torch.Generator they are
given, so a batch is a pure function of its seed.

Token layouts keep roles apart: keys and values come from disjoint vocabulary bands (Arora et al.
2023, "Zoology", MQAR), and blank/marker/noise tokens have bands of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping, Optional

import torch

from hybridlab.config import Config, ConfigError, field, join_path, suggest
from hybridlab.data.corpus import generator
from hybridlab.errors import UserError

CHUNK = 64  # eval and long examples are generated in chunks of this many, each with its own seed


# ----------------------------------------------------------------------------- sampling helpers

def distinct(B: int, n: int, k: int, g) -> torch.Tensor:
    """(B, k) distinct integers from [0, n) per row, in random order (uniform over k-subsets)."""
    if n <= 2048 or k * k > n:  # top-k of uniform noise is a uniform random k-subset, shuffled
        return torch.rand(B, n, generator=g).topk(k, dim=1).indices
    # Sparse case: draw with replacement and redraw the rows that repeat (rare when k^2 <= n).
    s = torch.randint(0, n, (B, k), generator=g)
    while True:
        srt = s.sort(dim=1).values
        bad = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if not bad.any():
            return s
        s[bad] = torch.randint(0, n, (int(bad.sum()), k), generator=g)


def gumbel_topk(logits: torch.Tensor, B: int, k: int, g) -> torch.Tensor:
    """(B, k) distinct indices drawn without replacement with probabilities softmax(logits)."""
    u = torch.rand(B, logits.numel(), generator=g).clamp_min(1e-12)
    return (logits - torch.log(-torch.log(u))).topk(k, dim=1).indices


def free_starts(B: int, region: int, units: int, unit_len: int, g) -> torch.Tensor:
    """(B, units) sorted start offsets of non-overlapping units at any offsets in a region.

    Choosing which `units` of the (region - units*(unit_len-1)) items are units, then shifting
    item i by i*(unit_len-1), places the units uniformly with any noise between them."""
    items = region - units * (unit_len - 1)
    s = distinct(B, items, units, g).sort(dim=1).values
    return s + torch.arange(units) * (unit_len - 1)


def put_units(x: torch.Tensor, answer: torch.Tensor, starts: torch.Tensor, units: torch.Tensor,
              answer_from: int) -> None:
    """Write units (B, U, u) at starts (B, U); mark unit tokens from `answer_from` on as answers."""
    B, U, u = units.shape
    pos = starts[:, :, None] + torch.arange(u)  # (B, U, u)
    x.scatter_(1, pos.reshape(B, U * u), units.reshape(B, U * u))
    if answer_from < u:
        answer.scatter_(1, pos[:, :, answer_from:].reshape(B, -1), True)


def need(ok: bool, path: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(join_path(path, key), message)


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class TaskConfig(Config):
    """Knobs every task has."""

    vocab_size: int = field(256, "tokens the task uses; the model's vocab must be at least this", ge=8)
    seq_len: Optional[int] = field(None, "tokens per example (null: the training seq_len)", ge=2,
                                   nullable=True)
    eval_examples: int = field(1024, "held-out examples per evaluation group", ge=1)

    def check(self, seq_len: int, path: str) -> None:
        """Cross-knob checks at a sequence length; raise ConfigError naming the knob."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type
    generate: Callable
    level: str          # the knob that sets difficulty (eval groups vary it)
    label: str          # its short name in group names: "kv=8"
    vary: bool = True   # False: only the trained setting is meaningful (memorization)
    help: str = ""


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, config: type, level: str, label: str, vary: bool = True):
    def wrap(fn):
        config.block_name = f"the {name} task"
        TASKS[name] = TaskSpec(name, config, fn, level, label, vary, (fn.__doc__ or "").strip())
        return fn
    return wrap


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class MQARConfig(TaskConfig):
    num_kv_pairs: int = field(8, "key-value pairs listed before the queries", ge=1)
    num_queries: Optional[int] = field(None, "keys queried (null: every key once)", ge=1, nullable=True)
    query_gaps: str = field("power", "where queries fall after the pairs: power law (most close by, "
                            "as zoology) or uniform", choices=("power", "uniform"))
    power_a: float = field(0.01, "power-law exponent a: P(gap i) ~ i^(a-1)", gt=0, le=1)
    random_filler: bool = field(True, "fill between queries with random tokens (else token 0)")

    def check(self, seq_len, path):
        half, P, Q = self.vocab_size // 2, self.num_kv_pairs, self.num_queries or self.num_kv_pairs
        need(P <= half - 1, path, "num_kv_pairs", f"must be <= {half - 1} (distinct keys from tokens "
             f"1..vocab_size//2 - 1 with vocab_size {self.vocab_size}), got {P}")
        need(Q <= P, path, "num_queries", f"must be <= num_kv_pairs ({P}), got {Q}")
        need(2 * P + 2 * Q <= seq_len + 1, path, "num_kv_pairs",
             f"{P} pairs and {Q} queries need seq_len >= {2 * P + 2 * Q - 1}, got {seq_len}")


@register_task("mqar", MQARConfig, "num_kv_pairs", "kv")
def mqar(cfg: MQARConfig, L: int, B: int, g):
    """Multi-query associative recall: k1 v1 ... kP vP, then queried keys each followed by its value."""
    V, P = cfg.vocab_size, cfg.num_kv_pairs
    Q, T, half = cfg.num_queries or P, L + 1, V // 2
    keys = 1 + distinct(B, half - 1, P, g)                # (B, P) from [1, V/2)
    values = half + distinct(B, V - half, P, g)           # (B, P) from [V/2, V)
    x = (torch.randint(0, V, (B, T), generator=g) if cfg.random_filler
         else torch.zeros(B, T, dtype=torch.long))
    answer = torch.zeros(B, T, dtype=torch.bool)
    x[:, :2 * P] = torch.stack([keys, values], -1).view(B, 2 * P)
    # Queries sit in 2-token slots after the pairs; slot i (gap i+1) drawn with P ~ i^(a-1).
    slots = (T - 2 * P) // 2
    gap = torch.arange(1, slots + 1, dtype=torch.float)
    logits = (cfg.power_a - 1) * gap.log() if cfg.query_gaps == "power" else torch.zeros(slots)
    starts = 2 * P + 2 * gumbel_topk(logits, B, Q, g)     # (B, Q)
    which = torch.rand(B, P, generator=g).argsort(dim=1)[:, :Q]  # (B, Q) queried pairs
    units = torch.stack([keys.gather(1, which), values.gather(1, which)], -1)  # (B, Q, 2)
    put_units(x, answer, starts, units, answer_from=1)
    return x, answer


@dataclass(frozen=True)
class NoisyRecallConfig(TaskConfig):
    num_kv_pairs: int = field(8, "key-value pairs among the noise", ge=1)
    num_queries: Optional[int] = field(None, "keys queried (null: every key once)", ge=1, nullable=True)
    noise_ratio: float = field(1.0, "noise tokens per pair token in the context", ge=0)
    noise_vocab: int = field(16, "noise tokens are ids 0..noise_vocab-1", ge=1)

    def check(self, seq_len, path):
        P, Q = self.num_kv_pairs, self.num_queries or self.num_kv_pairs
        band = (self.vocab_size - self.noise_vocab) // 2
        need(band >= P, path, "num_kv_pairs", f"must be <= {band} ((vocab_size - noise_vocab) // 2), "
             f"got {P}")
        need(Q <= P, path, "num_queries", f"must be <= num_kv_pairs ({P}), got {Q}")
        ctx = 2 * P + int(2 * P * self.noise_ratio)
        need(ctx + 2 * Q <= seq_len + 1, path, "num_kv_pairs", f"{P} pairs with noise_ratio "
             f"{self.noise_ratio} and {Q} queries need seq_len >= {ctx + 2 * Q - 1}, got {seq_len}")


@register_task("noisy_recall", NoisyRecallConfig, "num_kv_pairs", "kv")
def noisy_recall(cfg: NoisyRecallConfig, L: int, B: int, g):
    """MQAR with the pairs and the queries scattered among noise tokens at arbitrary offsets."""
    V, P, nv = cfg.vocab_size, cfg.num_kv_pairs, cfg.noise_vocab
    Q, T, band = cfg.num_queries or P, L + 1, (V - nv) // 2
    keys = nv + distinct(B, band, P, g)                   # (B, P) from [nv, nv+band)
    values = nv + band + distinct(B, V - nv - band, P, g)  # (B, P) after the keys
    x = torch.randint(0, nv, (B, T), generator=g)
    answer = torch.zeros(B, T, dtype=torch.bool)
    ctx = 2 * P + int(2 * P * cfg.noise_ratio)
    put_units(x, answer, free_starts(B, ctx, P, 2, g), torch.stack([keys, values], -1), 2)
    which = torch.rand(B, P, generator=g).argsort(dim=1)[:, :Q]  # (B, Q)
    units = torch.stack([keys.gather(1, which), values.gather(1, which)], -1)  # (B, Q, 2)
    put_units(x, answer, ctx + free_starts(B, T - ctx, Q, 2, g), units, answer_from=1)
    return x, answer


@dataclass(frozen=True)
class FuzzyRecallConfig(TaskConfig):
    num_kv_pairs: int = field(8, "key-value pairs", ge=1)
    num_queries: Optional[int] = field(None, "keys queried (null: every key once)", ge=1, nullable=True)
    key_len: int = field(2, "tokens per key", ge=1)
    value_len: int = field(2, "tokens per value (all are answers)", ge=1)
    key_vocab: Optional[int] = field(None, "distinct key tokens; small values make keys share "
                                     "tokens (null: half the vocab)", ge=2, nullable=True)

    def kv_bands(self) -> tuple[int, int]:
        kv = self.key_vocab or (self.vocab_size - 1) // 2
        return kv, self.vocab_size - 1 - kv

    def check(self, seq_len, path):
        P, Q = self.num_kv_pairs, self.num_queries or self.num_kv_pairs
        kv, vb = self.kv_bands()
        need(vb >= 2, path, "key_vocab", f"leaves {vb} value tokens in vocab_size {self.vocab_size}")
        need(kv ** self.key_len >= P, path, "num_kv_pairs",
             f"must be <= key_vocab ** key_len = {kv ** self.key_len}, got {P}")
        need(Q <= P, path, "num_queries", f"must be <= num_kv_pairs ({P}), got {Q}")
        u = self.key_len + self.value_len
        need(u * (P + Q) <= seq_len + 1, path, "num_kv_pairs",
             f"{P} pairs and {Q} queries of {u} tokens need seq_len >= {u * (P + Q) - 1}, got {seq_len}")


@register_task("fuzzy_recall", FuzzyRecallConfig, "num_kv_pairs", "kv")
def fuzzy_recall(cfg: FuzzyRecallConfig, L: int, B: int, g):
    """Recall with multi-token keys and values: a query is a whole key; every value token is scored."""
    P, kl, vl = cfg.num_kv_pairs, cfg.key_len, cfg.value_len
    Q, T, u = cfg.num_queries or P, L + 1, kl + vl
    kv, vb = cfg.kv_bands()
    space = kv ** kl
    if space <= 2 ** 62:  # distinct keys as numbers in base kv, then their digits
        idx = distinct(B, space, P, g)[:, :, None]                       # (B, P, 1)
        keys = 1 + idx // kv ** torch.arange(kl) % kv                   # (B, P, kl)
    else:                 # collisions have probability ~P^2/space: negligible
        keys = 1 + torch.randint(0, kv, (B, P, kl), generator=g)
    values = 1 + kv + torch.randint(0, vb, (B, P, vl), generator=g)      # (B, P, vl)
    pairs = torch.cat([keys, values], -1)                               # (B, P, u)
    x = torch.zeros(B, T, dtype=torch.long)                             # 0 = blank
    answer = torch.zeros(B, T, dtype=torch.bool)
    x[:, :P * u] = pairs.reshape(B, P * u)
    which = torch.rand(B, P, generator=g).argsort(dim=1)[:, :Q]         # (B, Q)
    starts = P * u + u * distinct(B, (T - P * u) // u, Q, g)           # (B, Q) aligned slots
    put_units(x, answer, starts, pairs.gather(1, which[:, :, None].expand(B, Q, u)), kl)
    return x, answer


@dataclass(frozen=True)
class SelectiveCopyConfig(TaskConfig):
    num_tokens: int = field(16, "data tokens scattered in the sequence, copied in order", ge=1)
    noise_vocab: int = field(0, "0: fill with a blank token; N: with random noise ids 2..N+1", ge=0)

    def check(self, seq_len, path):
        need(self.vocab_size - 2 - self.noise_vocab >= 2, path, "noise_vocab",
             f"leaves fewer than 2 data tokens in vocab_size {self.vocab_size}")
        need(2 * self.num_tokens + 1 <= seq_len + 1, path, "num_tokens",
             f"{self.num_tokens} tokens need seq_len >= {2 * self.num_tokens}, got {seq_len}")


@register_task("selective_copy", SelectiveCopyConfig, "num_tokens", "copy")
def selective_copy(cfg: SelectiveCopyConfig, L: int, B: int, g):
    """Data tokens scattered among blanks/noise; after a delimiter (id 1), copy them in order."""
    C, T, nv = cfg.num_tokens, L + 1, cfg.noise_vocab
    R = T - 1 - C                                                       # scatter region
    data = 2 + nv + torch.randint(0, cfg.vocab_size - 2 - nv, (B, C), generator=g)
    x = (2 + torch.randint(0, nv, (B, T), generator=g)) if nv else torch.zeros(B, T, dtype=torch.long)
    x.scatter_(1, distinct(B, R, C, g).sort(dim=1).values, data)
    x[:, R] = 1
    x[:, R + 1:] = data
    answer = torch.zeros(B, T, dtype=torch.bool)
    answer[:, R + 1:] = True
    return x, answer


@dataclass(frozen=True)
class CompressionConfig(TaskConfig):
    num_tokens: int = field(32, "length of the random string to reproduce", ge=1)

    def check(self, seq_len, path):
        need(2 * self.num_tokens + 1 <= seq_len + 1, path, "num_tokens",
             f"{self.num_tokens} tokens need seq_len >= {2 * self.num_tokens}, got {seq_len}")


@register_task("compression", CompressionConfig, "num_tokens", "len")
def compression(cfg: CompressionConfig, L: int, B: int, g):
    """A random string, a compress marker (id 1), then the string again: the state must hold it."""
    C, T = cfg.num_tokens, L + 1
    data = 2 + torch.randint(0, cfg.vocab_size - 2, (B, C), generator=g)
    x = torch.zeros(B, T, dtype=torch.long)                             # blank padding in front
    x[:, T - 2 * C - 1:T - C - 1] = data
    x[:, T - C - 1] = 1
    x[:, T - C:] = data
    answer = torch.zeros(B, T, dtype=torch.bool)
    answer[:, T - C:] = True
    return x, answer


@dataclass(frozen=True)
class MemorizationConfig(TaskConfig):
    num_kv_pairs: int = field(64, "size of the one fixed key->value mapping", ge=1)
    mapping_seed: int = field(0, "seed of the mapping (the same for every run and batch)")

    def check(self, seq_len, path):
        need(self.num_kv_pairs <= self.vocab_size // 2 - 1, path, "num_kv_pairs",
             f"must be <= {self.vocab_size // 2 - 1} (vocab_size // 2 - 1), got {self.num_kv_pairs}")

    def mapping(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator("memorization-mapping", self.mapping_seed, self.vocab_size, self.num_kv_pairs)
        half = self.vocab_size // 2
        keys = 1 + distinct(1, half - 1, self.num_kv_pairs, g)[0]                    # (P,)
        values = half + torch.randint(0, self.vocab_size - half, (self.num_kv_pairs,), generator=g)
        return keys, values


@register_task("memorization", MemorizationConfig, "num_kv_pairs", "kv", vary=False)
def memorization(cfg: MemorizationConfig, L: int, B: int, g):
    """Pairs k v from one fixed mapping, never shown in context: recall must live in the weights."""
    keys, values = cfg.mapping()
    T = L + 1
    pick = torch.randint(0, cfg.num_kv_pairs, (B, T // 2), generator=g)
    x = torch.zeros(B, T, dtype=torch.long)
    x[:, 0:2 * (T // 2):2] = keys[pick]
    x[:, 1:2 * (T // 2):2] = values[pick]
    answer = torch.zeros(B, T, dtype=torch.bool)
    answer[:, 1:2 * (T // 2):2] = True
    return x, answer


# ----------------------------------------------------------------------------- dataset

class TaskDataset:
    """A synthetic task behind the common dataset interface (see hybridlab.data)."""

    kind = "task"

    def __init__(self, spec: TaskSpec, cfg: TaskConfig, seq_len: int, path: str = "data"):
        self.spec, self.cfg, self.seq_len, self.path = spec, cfg, seq_len, path
        self.name, self.vocab_size = spec.name, cfg.vocab_size
        self._eval: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _pairs(self, cfg, L: int, B: int, g):
        x, answer = self.spec.generate(cfg, L, B, g)                    # (B, L+1) each
        targets = torch.where(answer[:, 1:], x[:, 1:], torch.full_like(x[:, 1:], -100))
        return x[:, :-1].contiguous(), targets

    def train_batch(self, step: int, batch_size: int, seed: int):
        g = generator(self.name + "-train", seed, step)
        return self._pairs(self.cfg, self.seq_len, batch_size, g)

    def levels(self) -> dict[str, TaskConfig]:
        """Eval settings: the trained one plus powers of two from 4 that fit at seq_len."""
        trained = getattr(self.cfg, self.spec.level)
        values = {trained}
        if self.spec.vary:
            values |= {2 ** i for i in range(2, int(math.log2(max(16, trained))) + 1)}
        out = {}
        for v in sorted(values):
            cfg = replace(self.cfg, **{self.spec.level: v})
            if v != trained and getattr(cfg, "num_queries", None):  # fewer pairs: query them all
                cfg = replace(cfg, num_queries=None)
            try:
                cfg.check(self.seq_len, self.path)
            except ConfigError:
                continue
            out[f"{self.spec.label}={v}"] = cfg
        return out

    def _group(self, label: str, cfg: TaskConfig, batch_size: int, max_batches: int | None = None):
        """A fixed held-out set of cfg.eval_examples, made in seeded chunks on first use."""
        chunks = self._eval.setdefault(label, [])
        total = self.cfg.eval_examples
        count = total if max_batches is None else min(total, batch_size * max_batches)
        while len(chunks) * CHUNK < count:
            g = generator(self.name + "-eval", label, len(chunks))
            chunks.append(self._pairs(cfg, self.seq_len, min(CHUNK, total - len(chunks) * CHUNK), g))
        inputs = torch.cat([c[0] for c in chunks])[:count]
        targets = torch.cat([c[1] for c in chunks])[:count]
        for i in range(0, count, batch_size):
            yield inputs[i:i + batch_size], targets[i:i + batch_size]

    def eval_groups(self) -> dict[str, Callable[..., Iterator]]:
        return {label: (lambda bs, mb=None, _l=label, _c=cfg: self._group(_l, _c, bs, mb))
                for label, cfg in self.levels().items()}

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator:
        label = f"{self.spec.label}={getattr(self.cfg, self.spec.level)}"
        return self._group(label, self.cfg, batch_size, max_batches)

    def _long(self, length: int, n: int):
        try:
            self.cfg.check(length, self.path)
        except ConfigError as e:
            raise UserError(f"task {self.name} cannot make examples of length {length}: "
                            f"{e.message}") from None
        parts = [self.spec.generate(self.cfg, length, min(CHUNK, n - i),
                                    generator(self.name + "-long", length, i // CHUNK))
                 for i in range(0, n, CHUNK)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def long_sequences(self, length: int, n: int) -> torch.Tensor:
        """(n, length+1) token streams at a new length, same knobs (MQAR: the same number of pairs,
        queries spread over the longer tail). Targets lost here: see `long_examples`."""
        return self._long(length, n)[0]

    def long_examples(self, length: int, n: int):
        """(inputs, targets), each (n, length), with the task's loss mask."""
        x, answer = self._long(length, n)                               # (n, length+1) each
        targets = torch.where(answer[:, 1:], x[:, 1:], torch.full_like(x[:, 1:], -100))
        return x[:, :-1].contiguous(), targets

    def encode(self, text: str) -> list[int]:
        raise UserError(f"task {self.name} has no text encoding")

    def decode(self, ids: list[int]) -> str:
        raise UserError(f"task {self.name} has no text encoding")


def make_task(data: Mapping, seq_len: int, path: str = "data") -> TaskDataset:
    name = data["task"]
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(join_path(path, "task"), f"unknown task {name!r}{suggest(str(name), TASKS)}; "
                          f"known: {', '.join(sorted(TASKS))}")
    spec = TASKS[name]
    cfg = spec.config.from_dict({k: v for k, v in data.items() if k != "task"}, 0, path,
                                cross_check=False)
    L = cfg.seq_len or seq_len
    cfg.check(L, path)
    return TaskDataset(spec, cfg, L, path)
