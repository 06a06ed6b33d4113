"""The `training:` section of an architecture YAML, and command-line overrides of it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import yaml

from hybridlab.config import Config, ConfigError, field, join_path


@dataclass(frozen=True)
class TrainConfig(Config):
    seq_len: int = field(256, "tokens per training sequence", ge=2)
    batch_size: int = field(16, "sequences per optimizer step over every process, unless tokens_per_step "
                                "is set; also sequences per validation batch", ge=1)
    tokens_per_step: Optional[int] = field(None, "tokens per optimizer step over every process and micro-batch "
                                                 "(paper: 524288); a multiple of seq_len, it sets the step's "
                                                 "sequences to tokens_per_step / seq_len (null: batch_size * "
                                                 "seq_len)", ge=1, nullable=True)
    micro_batch_size: Optional[int] = field(None, "sequences per forward/backward on each process; gradients "
                                                  "accumulate over the step (null: the process's whole share, on "
                                                  "CUDA the largest power of two of it that fits)", ge=1, nullable=True)
    pack_documents: bool = field(True, "with prepared data (documents packed into sequences): no attention or "
                                       "state crosses a document boundary; false: they flow across")
    compile: Optional[bool] = field(None, "torch.compile the model for training (the first steps pay the "
                                          "compilation; not in the paper). null: on CUDA, where it measured "
                                          "faster (docs/measurements/, tenth session), off elsewhere",
                                    nullable=True)
    parallel: str = field("ddp", "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: "
                                 "weights, gradients and optimizer sharded)", choices=("ddp", "fsdp"))
    steps: Optional[int] = field(1000, "optimizer steps (null: derive from tokens)", ge=1, nullable=True)
    tokens: Optional[int] = field(None, "training tokens; sets steps = tokens / tokens per step",
                                  ge=1, nullable=True)
    lr: float = field(5e-4, "peak learning rate (paper: 5e-4)", gt=0)
    min_lr: float = field(1e-5, "cosine floor (paper: 1e-5)", ge=0)
    warmup_steps: int = field(100, "linear warm-up steps (paper: 2000)", ge=0)
    weight_decay: float = field(0.01, "AdamW weight decay on matrices (paper: 0.01)", ge=0)
    beta1: float = field(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = field(0.95, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = field(1.0, "clip the global gradient norm (0: off)", ge=0)
    seed: int = field(0, "seed for init, data and Gumbel noise", ge=0)
    log_every: int = field(10, "steps between logged scalars", ge=1)
    eval_every: int = field(200, "steps between validation passes (0: only at the end)", ge=0)
    eval_batches: int = field(20, "validation batches per pass", ge=1)
    checkpoint_every: int = field(500, "steps between checkpoints (0: only at the end)", ge=0)
    keep_checkpoints: int = field(2, "checkpoints kept (oldest removed)", ge=1)
    precision: str = field("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    device: str = field("auto", "auto: cuda if present", choices=("auto", "cpu", "cuda"))
    runs_dir: str = field("runs", "where run folders go")
    run_name: Optional[str] = field(None, "run folder name (null: <arch name>-<time>)", nullable=True)
    init_from: Optional[str] = field(None, "start from this checkpoint's weights (a checkpoint or run folder, "
                                           "relative to the YAML's folder), e.g. one `hybridlab import` or "
                                           "`upcycle` wrote; not its optimizer or step (null: fresh init)",
                                     nullable=True)
    freeze: Optional[list] = field(None, "parts not trained: block types (mamba2), layer indices (3) or embed, "
                                         "norm_f, head, e.g. [mamba2, embed] (null: train everything)",
                                   nullable=True)
    lr_multipliers: Optional[dict] = field(None, "peak lr multiplier per block type, layer index or embed/"
                                                 "norm_f/head, e.g. {sal: 10} (null: lr everywhere)", nullable=True)

    block_name = "training"

    def validate(self, d_model: int = 0, path: str = "") -> None:
        if self.min_lr > self.lr:
            raise ConfigError(join_path(path, "min_lr"), f"must be <= lr ({self.lr}), got {self.min_lr}")
        if self.tokens_per_step is not None and self.tokens_per_step % self.seq_len:
            raise ConfigError(join_path(path, "tokens_per_step"), f"must be a multiple of seq_len "
                                                                  f"({self.seq_len}), got {self.tokens_per_step}")
        if self.micro_batch_size is not None and self.global_batch() % self.micro_batch_size:
            raise ConfigError(join_path(path, "micro_batch_size"), f"must divide the step's "
                                                                   f"{self.global_batch()} sequences, got "
                                                                   f"{self.micro_batch_size}")
        check_part_keys(self.freeze, join_path(path, "freeze"), list)
        check_part_keys(self.lr_multipliers, join_path(path, "lr_multipliers"), dict)

    def global_batch(self) -> int:
        """Sequences per optimizer step, over every process and micro-batch."""
        if self.tokens_per_step is not None:
            return self.tokens_per_step // self.seq_len
        return self.batch_size

    def compiles(self, device) -> bool:
        """Whether training runs the model through torch.compile on `device`."""
        return self.compile if self.compile is not None else device.type == "cuda"

    def total_steps(self) -> int:
        if self.tokens is not None:
            return max(1, self.tokens // (self.global_batch() * self.seq_len))
        return self.steps

    def warmup(self) -> int:
        return min(self.warmup_steps, max(self.total_steps() - 1, 0))


def check_part_keys(value, path: str, kind: type) -> None:
    """freeze (a list) and lr_multipliers (a mapping to numbers > 0) name model parts: block
    types or embed/norm_f/head (strings), or layer indices (integers >= 0). Whether the model has
    them is checked when training starts (hybridlab/finetune.py)."""
    if value is None:
        return
    if not isinstance(value, kind):
        example = "[mamba2, embed]" if kind is list else "{sal: 10}"
        raise ConfigError(path, f"must be a {'list' if kind is list else 'mapping'} like {example}, got {value!r}")
    for i, key in enumerate(value):
        where = join_path(path, i if kind is list else str(key))
        if isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, int) and key < 0):
            raise ConfigError(where, f"must be a block type, embed, norm_f, head or a layer index >= 0, got {key!r}")
        if kind is dict:
            m = value[key]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < float("inf"):
                raise ConfigError(where, f"must be a number > 0, got {m!r}")


def parse_training(raw: Any, overrides: dict[str, Any] | None = None, source: str | None = None):
    """-> (TrainConfig, data spec). `raw` is the YAML `training:` mapping (or None)."""
    try:
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError("training", f"must be a mapping of training settings, got {raw!r}")
        raw = dict(raw or {})
        for key, value in (overrides or {}).items():
            raw[key] = value
        data = raw.pop("data", "default")
        raw.pop("data_base_dir", None)
        if "tokens" in raw and raw["tokens"] is not None and "steps" not in (overrides or {}):
            raw.setdefault("steps", None)
        cfg = TrainConfig.from_dict(raw, 0, "training")
        return cfg, data
    except ConfigError as e:
        raise e.with_source(source) if source else e


def parse_override(text: str) -> tuple[str, Any]:
    """'lr=1e-3' -> ('lr', 0.001); values are read as YAML ('null', 'true', '[1, 2]')."""
    if "=" not in text:
        raise ConfigError("--set", f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip()
    if key.startswith("training."):
        key = key[len("training."):]
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def with_updates(cfg: TrainConfig, **kw) -> TrainConfig:
    return replace(cfg, **kw)
