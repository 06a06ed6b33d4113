"""`hybridlab train`: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, auxiliary losses,
atomic checkpoints with exact resume, TensorBoard tracking."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from . import checkpoint as ckpt_io
from .config import is_plain_name
from .errors import ConfigError, TrainingDiverged, TrainingInterrupted, UserError
from .graph import Arch, load_arch, parse_arch
from .train_config import TrainConfig, parse_training


@dataclass
class Run:
    arch: Arch
    cfg: TrainConfig
    data_spec: object
    run_dir: Path
    base_dir: Path  # relative data paths resolve against the YAML's folder
    resume: bool

    def config_dict(self) -> dict:
        training = {**self.cfg.to_dict(), "data": self.data_spec, "data_base_dir": str(self.base_dir)}
        return {**self.arch.to_dict(), "training": training}

    def config_yaml(self) -> str:
        return yaml.safe_dump(self.config_dict(), sort_keys=False, default_flow_style=None, width=1000)


def prepare(arch_path: str | None = None, resume: str | None = None, overrides: dict | None = None) -> Run:
    """Resolve what to train: a new run from an architecture YAML, or a stopped run to resume."""
    overrides = overrides or {}
    if resume is not None:
        run_dir = Path(resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.exists():
            raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
        try:
            data = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict):
            raise UserError(f"{cfg_path}: not a run's config (empty or not a mapping); the run "
                            "folder is damaged")
        arch = parse_arch({k: v for k, v in data.items() if k != "training"}, str(cfg_path))
        if arch_path is not None and load_arch(arch_path).arch_hash() != arch.arch_hash():
            raise UserError(f"{arch_path}: is not the architecture of the run in {run_dir} "
                            f"(hash {load_arch(arch_path).arch_hash()} vs {arch.arch_hash()})")
        training = dict(data.get("training") or {})
        base_dir = Path(training.pop("data_base_dir", run_dir))
        cfg, data_spec = parse_training(training, overrides, str(cfg_path))
        return Run(arch, cfg, data_spec, run_dir, base_dir, True)
    if arch_path is None:
        raise UserError("give an architecture YAML, or --resume RUN_DIR")
    arch = load_arch(arch_path)
    raw = yaml.safe_load(Path(arch_path).read_text())
    return prepare_new(arch, raw.get("training"), overrides, arch_path, Path(arch_path).resolve().parent)


def prepare_new(arch: Arch, training, overrides: dict, source: str, base_dir: Path) -> Run:
    """A new run of `arch` with a raw `training:` mapping (plus overrides)."""
    cfg, data_spec = parse_training(training, overrides, source)
    name = cfg.run_name or f"{arch.name}-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_name(name)
    run_dir = Path(cfg.runs_dir) / name
    if ckpt_io.has_checkpoint(run_dir):
        raise UserError(f"{run_dir}: a run with checkpoints is already there; continue it with "
                        f"`hybridlab train --resume {run_dir}` or pick another run_name")
    if (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir}: a run that stopped before its first checkpoint is there; "
                        f"`hybridlab train --resume {run_dir}` starts it over from step 0, or "
                        "pick another run_name")
    return Run(arch, cfg, data_spec, run_dir, base_dir, False)


def check_run_name(name: str) -> None:
    """A run name is one folder inside runs_dir: no separators, no '..', not absolute."""
    if not is_plain_name(name):
        raise ConfigError("training.run_name", f"must be a plain folder name (no '/', '..' or "
                                               f"absolute path), got {name!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine to min_lr at the last step (the paper's schedule)."""
    total, warm = cfg.total_steps(), cfg.warmup()
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay: float):
    """Decay matrices and embeddings; not norms, biases or SSM parameters (A_log, D, dt_bias)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pick_device(cfg: TrainConfig):
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device is cuda, but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: TrainConfig, device):
    import torch

    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary and checkpoints,
    so an interrupted run never saves a half-applied optimizer step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def uninstall(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def train(run: Run, stop_after: int | None = None, quiet: bool = False, warn=None) -> dict:
    """Train until cfg.total_steps() (or `stop_after` more steps). Returns a summary dict.

    warn(lines): what to do with the blocks' warnings at each validation (e.g. a block that is
    effectively off); default: one line each on stderr, quiet or not."""
    import torch

    from hybridlab.data import make_dataset

    from .diagnostics import print_warnings, progress_text, training_summary
    from .model import HybridLM
    from .progress import Progress
    from .tracking import Tracker, block_metric_keys, hparams_for, provenance
    from .validation import validate

    cfg, arch = run.cfg, run.arch
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = pick_device(cfg)
    amp = autocast_dtype(cfg, device)
    dataset = make_dataset(run.data_spec, cfg.seq_len, path="training.data", base_dir=run.base_dir)
    if dataset.vocab_size > arch.vocab_size:
        raise ConfigError("training.data", f"the data uses {dataset.vocab_size} token ids but the model's "
                                           f"vocab_size is {arch.vocab_size}")
    model = HybridLM(arch).to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    total = cfg.total_steps()

    step = 0
    ckpt_root = run.run_dir / "checkpoints"
    restart = run.resume and not ckpt_io.has_checkpoint(run.run_dir)
    if restart:  # stopped before its first checkpoint: nothing to continue, so start it over
        if not quiet:
            print(f"{run.run_dir} holds no checkpoint yet: starting it over from step 0")
        for stale in [run.run_dir / "metrics.jsonl", *run.run_dir.glob("events.out.tfevents.*")]:
            stale.unlink(missing_ok=True)
        run.resume = False
    if run.resume:
        ckpt = ckpt_io.resolve(run.run_dir)
        ckpt_io.verify(ckpt)
        ckpt_io.load_weights(model, ckpt)
        state = ckpt_io.load_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        if not quiet:
            print(f"resuming {run.run_dir} at step {step}")
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.write_atomic(run.run_dir / "config.yaml", run.config_yaml())
        import json

        meta = {"arch_hash": arch.arch_hash(), "params": model.num_params(), **provenance()}
        ckpt_io.write_atomic(run.run_dir / "meta.json", json.dumps(meta, indent=1))
        if not quiet:
            print(f"training {arch.name} ({model.num_params():,} parameters) in {run.run_dir} "
                  f"(TensorBoard: tensorboard --logdir {run.run_dir.parent})", flush=True)

    hp = hparams_for(arch, cfg, dataset.name, model.num_params())
    tracker = Tracker(run.run_dir, hp, resume_step=step if run.resume else None)
    if not run.resume:
        tracker.text("config", "```\n" + run.config_yaml() + "\n```")
        tracker.text("meta", (run.run_dir / "meta.json").read_text())

    def save(at_step: int) -> Path:
        state = {"step": at_step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": rng_state(), "tokens": at_step * cfg.batch_size * cfg.seq_len}
        return ckpt_io.save_checkpoint(ckpt_root, at_step, model, state, run.config_yaml(), cfg.keep_checkpoints)

    def evaluate(at_step: int) -> dict:
        v = validate(model, dataset, cfg.batch_size, cfg.eval_batches, device, amp)
        metrics = v.scalars
        hparam_metrics = {key: metrics.get(source, math.nan) for key, source in block_metric_keys().items()}
        tracker.log(at_step, {**metrics, "hparam/val_loss": metrics["val/loss"], "hparam/val_ppl": metrics["val/ppl"],
                              "hparam/recall_acc": metrics.get("val/acc", math.nan), **hparam_metrics})
        for tag, values in v.histograms.items():
            tracker.histogram(tag, values, at_step)
        if not quiet:  # the held-out figures in the terminal too, not only in TensorBoard
            if bar:
                bar.clear()
            print(f"step {at_step}: val/loss {metrics['val/loss']:.4f}, val/ppl {metrics['val/ppl']:.3f}"
                  + (f", val/acc {metrics['val/acc']:.3f}" if "val/acc" in metrics else "")
                  + f" ({cfg.eval_batches} batches of {cfg.batch_size})", flush=True)
        if v.warnings:
            if bar:
                bar.clear()
            (warn or print_warnings)(v.warnings)
        return metrics

    end = total if stop_after is None else min(total, step + stop_after)
    stop = _StopRequest()
    bar = None if quiet else Progress(total, start=step)
    tokens_per_step = cfg.batch_size * dataset.seq_len
    t_last, steps_since, loss_ema, last_metrics = time.perf_counter(), 0, None, {}
    blocks_summary = training_summary({})  # the blocks' summarised metrics at the last logged step
    tok_s = 0.0
    model.train()
    try:
        stop.install()
        while step < end:
            if stop.requested:
                raise KeyboardInterrupt
            inputs, targets = dataset.train_batch(step, cfg.batch_size, cfg.seed)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(inputs, targets, return_logits=False, step=step)
            loss = out.loss
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                last = ckpt_io.resolve(run.run_dir) if ckpt_root.exists() else None
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; stopped. "
                    + (f"Last good checkpoint: {last}. " if last else "No checkpoint was written yet. ")
                    + "Try a lower training.lr or stronger grad_clip.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            step += 1
            steps_since += 1
            loss_ema = loss_value if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_value
            if step % cfg.log_every == 0 or step == end:
                now = time.perf_counter()
                tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
                scalars = {"train/loss": loss_value, "train/ce_loss": out.ce_loss.item(),
                           "train/aux_loss": float(out.aux_loss.detach() if torch.is_tensor(out.aux_loss) else out.aux_loss), "train/lr": sched.get_last_lr()[0],
                           "train/grad_norm": grad_norm.item(), "train/tokens_per_s": tok_s,
                           "hparam/train_loss": loss_ema, "hparam/tokens_per_s": tok_s}
                scalars.update({f"blocks/{k}": v.item() for k, v in out.metrics.items()})
                tracker.log(step, scalars)
                blocks_summary = training_summary(out.metrics)
                if bar:
                    bar.update(step, loss_ema, tok_s, progress_text(blocks_summary))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                last_metrics = evaluate(step)
                model.train()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
                save(step)
    except KeyboardInterrupt:
        if bar:
            bar.close()
        path = save(step)
        tracker.close()
        raise TrainingInterrupted(f"interrupted at step {step}; saved {path}. "
                        f"Continue with: hybridlab train --resume {run.run_dir}") from None
    except BaseException:
        tracker.close()
        raise
    finally:
        stop.uninstall()
    if bar:
        bar.close()
    if step >= total:
        last_metrics = evaluate(step)
    save(step)
    tracker.close()
    summary = {"run_dir": str(run.run_dir), "step": step, "train_loss": loss_ema, "tokens_per_s": tok_s,
               **blocks_summary, **last_metrics}
    if not quiet:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last_metrics.items())
        print(f"done: step {step}/{total} in {run.run_dir}" + (f"; {shown}" if shown else ""))
    return summary
