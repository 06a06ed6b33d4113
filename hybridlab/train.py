"""`hybridlab train`: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, auxiliary losses,
atomic checkpoints with exact resume, TensorBoard tracking."""
from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from . import checkpoint as ckpt_io
from . import finetune
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
    so an interrupted run never saves a half-applied optimizer step.

    With several processes the flag is all-reduced at each step, so every process stops at the
    same step; a second signal does not stop at once there (torchrun passes a Ctrl-C on to its
    workers, so each gets it twice, and one process leaving a collective would hang the others)."""

    def __init__(self, escalate: bool = True):
        self.requested = False
        self.escalate = escalate
        self._old = {}

    def install(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and self.escalate:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def uninstall(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


class _NoTracker:
    """What processes other than rank 0 log: nothing."""

    def log(self, *a, **k): pass
    def histogram(self, *a, **k): pass
    def text(self, *a, **k): pass
    def close(self): pass


def micro_seed(seed: int, step: int, index: int) -> int:
    """The random stream (Gumbel noise, exploration) of micro-batch `index` of a step, counted
    over every process: a pure function, so a run's losses do not depend on how many processes
    share the step (for a given micro_batch_size) and need no RNG state to resume."""
    digest = hashlib.blake2b(repr(("micro", seed, step, index)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def check_split(cfg: TrainConfig, world: int, micro: int | None) -> None:
    """The step's global batch must split evenly into processes x micro-batches."""
    batch = cfg.global_batch()
    key = "training.tokens_per_step" if cfg.tokens_per_step is not None else "training.batch_size"
    if batch % world:
        raise ConfigError(key, f"the step's {batch} sequences do not split evenly over {world} processes")
    if micro is not None and (batch // world) % micro:
        raise ConfigError("training.micro_batch_size", f"each of {world} processes takes {batch // world} of "
                                                       f"the step's {batch} sequences, not a multiple of {micro}")


def choose_micro_batch(cfg: TrainConfig, share: int, model, dataset, device, amp, dist) -> int:
    """training.micro_batch_size, or when it is null: the process's whole share of the step on
    the CPU; on CUDA the largest power of two dividing the share whose forward and backward fit,
    with room left for AdamW's two moments (a probe of a few steps on the unwrapped model, so
    with FSDP2 it is conservative: set micro_batch_size for a model that only fits sharded).
    Every process takes the smallest any of them found."""
    import torch

    if cfg.micro_batch_size is not None:
        return cfg.micro_batch_size
    if device.type != "cuda":
        return share
    sizes = [m for m in (2 ** k for k in range(share.bit_length() - 1, -1, -1)) if share % m == 0]
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory
    moments = 2 * 4 * sum(p.numel() for p in model.parameters())
    saved = {name: buf.clone() for name, buf in model.named_buffers()}  # blocks may update buffers in training
    chosen = 1
    with torch.random.fork_rng(devices=[device]):
        for size in sizes:
            inputs, targets = (t.to(device) for t in dataset.train_batch(0, size, cfg.seed)[:2])
            torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = model(inputs, targets, return_logits=False, step=0).loss
                loss.backward()
                fits = torch.cuda.max_memory_allocated(device) + moments <= budget
            except torch.OutOfMemoryError:
                fits = False
            loss = None
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if fits:
                chosen = size
                break
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(saved[name])
    return dist.min(chosen)


def pinned(draw, device):
    """The data loader's draw, its tensors in page-locked memory when training on CUDA: a copy
    from pageable memory makes the host wait until the GPU has run everything queued before it
    (CUDA synchronises the stream for such copies), so every micro-batch's input copy emptied
    the GPU's queue; from pinned memory the copies are asynchronous (`non_blocking=True`)."""
    if device.type != "cuda":
        return draw
    return lambda *args: tuple(t.pin_memory() for t in draw(*args))


def accumulate(wrapped, micros: list[tuple], dist, step: int, n_valid: int, n_micro: int, amp,
               seed: int):
    """Forward and backward of this process's micro-batches of a step, gradients summed in the
    parameters' .grad as one big batch over every process would give them. n_valid: the step's
    target tokens (!= -100) over every process; n_micro: its micro-batches over every process.
    -> (this process's part of the step's loss, CE and aux loss, a float64 tensor of 3), its
    block metrics averaged over its micro-batches."""
    import torch

    from . import distributed

    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    metrics = {}
    for i, mb in enumerate(micros):
        torch.manual_seed(micro_seed(seed, step, dist.rank * len(micros) + i))
        inputs, targets, *packed = (t.to(dist.device, non_blocking=True) for t in mb)
        seq_idx = packed[0] if packed else None  # (B, L) document ids of packed sequences
        with distributed.no_sync(wrapped, last=i == len(micros) - 1):
            with torch.autocast(dist.device.type, dtype=amp, enabled=amp is not None):
                out = wrapped(inputs, targets, return_logits=False, step=step, seq_idx=seq_idx)
            # What one big batch would give: each micro-batch's CE (a mean over its target
            # tokens) weighted by its share of the step's target tokens, the blocks' auxiliary
            # losses averaged over micro-batches. aux is read off out.loss = ce + aux: a tensor
            # even in a model without auxiliary losses.
            ce_w = int((mb[1] != -100).sum()) / n_valid
            aux = out.loss - out.ce_loss
            loss = out.ce_loss * ce_w + aux / n_micro
            (loss * dist.world).backward()  # DDP and FSDP2 average gradients over processes
        sums += torch.stack([x.detach().double() for x in (loss, out.ce_loss * ce_w, aux / n_micro)])
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float() / len(micros)
    return sums, metrics


def train(run: Run, stop_after: int | None = None, quiet: bool = False, warn=None) -> dict:
    """Train until cfg.total_steps() (or `stop_after` more steps). Returns a summary dict.

    Under torchrun every process calls this; rank 0 alone writes the run folder (but for
    FSDP2's checkpoint shards) and prints.

    warn(lines): what to do with the blocks' warnings at each validation (e.g. a block that is
    effectively off); default: one line each on stderr, quiet or not."""
    import torch

    from hybridlab.data import make_dataset

    from . import distributed
    from .diagnostics import print_warnings, progress_text, training_summary
    from .model import HybridLM
    from .progress import Progress
    from .tracking import Tracker, block_metric_keys, hparams_for, provenance
    from .validation import validate

    cfg, arch = run.cfg, run.arch
    dist = distributed.setup(pick_device(cfg))
    device, main = dist.device, dist.main
    quiet = quiet or not main
    if dist.active:  # one run folder: rank 0's (a default name holds the time it started)
        run.run_dir = Path(dist.broadcast(str(run.run_dir)))
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    random.seed(cfg.seed)
    amp = autocast_dtype(cfg, device)
    dataset = make_dataset(run.data_spec, cfg.seq_len, path="training.data", base_dir=run.base_dir)
    if dataset.vocab_size > arch.vocab_size:
        raise ConfigError("training.data", f"the data uses {dataset.vocab_size} token ids but the model's "
                                           f"vocab_size is {arch.vocab_size}")
    # Packed documents (prepared data): blocks get each token's document id (seq_idx) so no
    # attention or state crosses a document; pack_documents: false lets them flow across.
    packed = cfg.pack_documents and hasattr(dataset, "train_batch_packed")
    draw = pinned(dataset.train_batch_packed if packed else dataset.train_batch, device)
    batch = cfg.global_batch()
    check_split(cfg, dist.world, cfg.micro_batch_size)
    share = batch // dist.world
    model = HybridLM(arch)
    if cfg.init_from and not (run.resume and ckpt_io.has_checkpoint(run.run_dir)):
        finetune.load_init(model, cfg.init_from, run.base_dir)  # pretrained weights; a resume has its own
    finetune.freeze(model, arch, cfg.freeze)  # before wrapping: DDP and FSDP2 see what trains
    model = model.to(device)
    micro = choose_micro_batch(cfg, share, model, dataset, device, amp, dist)
    wrapped = distributed.wrap(model, dist, cfg.parallel, amp)  # FSDP2 shards `model` in place
    if cfg.compiles(device):  # one graph per micro-batch shape; the kernels trace as custom ops
        # Inductor's note to its own developers on a softmax it splits: not the user's to act on
        warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly")
        wrapped = torch.compile(wrapped)
    sharded = cfg.parallel == "fsdp"
    opt = torch.optim.AdamW(finetune.param_groups(model, arch, cfg.weight_decay, cfg.lr, cfg.lr_multipliers),
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.lr)
    total = cfg.total_steps()

    step = 0
    ckpt_root = run.run_dir / "checkpoints"
    restart = run.resume and not ckpt_io.has_checkpoint(run.run_dir)
    dist.barrier()  # every process has looked at the run folder before rank 0 writes to it
    if restart:  # stopped before its first checkpoint: nothing to continue, so start it over
        if not quiet:
            print(f"{run.run_dir} holds no checkpoint yet: starting it over from step 0")
        if main:
            for stale in [run.run_dir / "metrics.jsonl", *run.run_dir.glob("events.out.tfevents.*")]:
                stale.unlink(missing_ok=True)
        run.resume = False
    if run.resume:
        ckpt = ckpt_io.resolve(run.run_dir)
        error = None
        if main:
            try:
                ckpt_io.verify(ckpt)
            except UserError as e:
                error = str(e)
        error = dist.broadcast(error)
        if error:
            raise UserError(error)
        state = ckpt_io.load_state(ckpt)
        if ckpt_io.is_sharded(ckpt):  # FSDP2's shards: into any number of processes
            ckpt_io.load_sharded(ckpt, model, opt)
        elif sharded and dist.active:
            ckpt_io.load_full_into_sharded(ckpt, model, opt, state["optimizer"])
        else:
            ckpt_io.load_weights(model, ckpt)
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = state["step"]
        if not quiet:
            was = state.get("world_size", 1)
            print(f"resuming {run.run_dir} at step {step}"
                  + (f" (saved by {was} processes, now {dist.world})" if was != dist.world else ""))
    elif main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.write_atomic(run.run_dir / "config.yaml", run.config_yaml())
        import json

        meta = {"arch_hash": arch.arch_hash(), "params": model.num_params(), **provenance()}
        ckpt_io.write_atomic(run.run_dir / "meta.json", json.dumps(meta, indent=1))
        if not quiet:
            where = f", {dist.world} process{'es' * (dist.world > 1)} ({cfg.parallel})" if dist.active else ""
            print(f"training {arch.name} ({model.num_params():,} parameters{where}) in {run.run_dir} "
                  f"(TensorBoard: tensorboard --logdir {run.run_dir.parent})", flush=True)

    tracker = _NoTracker()
    if main:
        hp = hparams_for(arch, cfg, dataset.name, model.num_params())
        hp["batch_size"] = batch  # the step's sequences, whatever key set them
        tracker = Tracker(run.run_dir, hp, resume_step=step if run.resume else None)
        if not run.resume:
            tracker.text("config", "```\n" + run.config_yaml() + "\n```")
            tracker.text("meta", (run.run_dir / "meta.json").read_text())

    def save(at_step: int) -> Path:
        state = {"step": at_step, "scheduler": sched.state_dict(), "rng": rng_state(),
                 "tokens": at_step * batch * cfg.seq_len, "world_size": dist.world,
                 "micro_batch_size": micro}
        if sharded:
            distributed.sync_buffers(model, dist)
            return ckpt_io.save_sharded(ckpt_root, at_step, model, opt, state, run.config_yaml(),
                                        cfg.keep_checkpoints, dist)
        state["optimizer"] = opt.state_dict()  # DDP: every process holds the whole of it
        path, error = None, None
        if main:
            try:
                path = ckpt_io.save_checkpoint(ckpt_root, at_step, model, state, run.config_yaml(),
                                               cfg.keep_checkpoints)
            except UserError as e:
                error = str(e)
        path, error = dist.broadcast((path, error))  # and the others wait until it is written
        if error:
            raise UserError(error)
        return path

    def evaluate(at_step: int) -> dict:
        # every process validates the same held-out set (FSDP2 needs them all to gather the
        # weights; with DDP the others would only wait); rank 0 logs
        if sharded:
            distributed.sync_buffers(model, dist)
        v = validate(model, dataset, cfg.batch_size, cfg.eval_batches, device, amp, packed=packed)
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
        if v.warnings and main:
            if bar:
                bar.clear()
            (warn or print_warnings)(v.warnings)
        return metrics

    end = total if stop_after is None else min(total, step + stop_after)
    stop = _StopRequest(escalate=not dist.active)
    bar = None if quiet else Progress(total, start=step)
    tokens_per_step = batch * dataset.seq_len
    n_micro = dist.world * (share // micro)  # micro-batches per step, over every process
    t_last, steps_since, loss_ema, last_metrics = time.perf_counter(), 0, None, {}
    blocks_summary = training_summary({})  # the blocks' summarised metrics at the last logged step
    tok_s = 0.0
    wrapped.train()
    if device.type == "cuda":  # train/peak_memory_gib: training's own, not the micro-batch probe's
        torch.cuda.reset_peak_memory_stats(device)
    # The next step's batch is drawn on a thread while this one trains: the step ends in a
    # host synchronisation (its loss), so a draw in the loop would leave the GPU idle for its
    # whole length. A draw is a function of (step, seed) alone, so this changes no number.
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridlab-data")
    upcoming = loader.submit(draw, step, batch, cfg.seed) if step < end else None
    try:
        stop.install()
        while step < end:
            drawn = upcoming.result()
            if step + 1 < end:
                upcoming = loader.submit(draw, step + 1, batch, cfg.seed)
            micros = distributed.local_micro_batches(drawn, dist, micro)
            valid = sum(int((mb[1] != -100).sum()) for mb in micros)
            counts = dist.sum([valid, float(stop.requested)])  # the step's target tokens; anyone stopping?
            if counts[1] > 0:
                raise KeyboardInterrupt
            n_valid = max(int(counts[0].item()), 1)
            opt.zero_grad(set_to_none=True)
            sums, metrics = accumulate(wrapped, micros, dist, step, n_valid, n_micro, amp, cfg.seed)
            loss_value, ce_value, aux_value = dist.sum(sums).tolist()  # the step's, over every process
            if not math.isfinite(loss_value):
                last = ckpt_io.resolve(run.run_dir) if ckpt_io.has_checkpoint(run.run_dir) else None
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; stopped. "
                    + (f"Last good checkpoint: {last}. " if last else "No checkpoint was written yet. ")
                    + "Try a lower training.lr or stronger grad_clip.")
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
                if dist.active and metrics:  # block metrics: the mean over every process's micro-batches
                    mean = dist.sum([metrics[k].item() for k in metrics]) / dist.world
                    metrics = dict(zip(metrics, mean.float()))
                scalars = {"train/loss": loss_value, "train/ce_loss": ce_value, "train/aux_loss": aux_value,
                           "train/lr": sched.get_last_lr()[0],
                           "train/grad_norm": distributed.full_tensor(grad_norm).item(), "train/tokens_per_s": tok_s,
                           "hparam/train_loss": loss_ema, "hparam/tokens_per_s": tok_s}
                scalars.update({f"blocks/{k}": v.item() for k, v in metrics.items()})
                if device.type == "cuda":  # this process's peak since the start (FSDP2: its shard's)
                    scalars["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                tracker.log(step, scalars)
                blocks_summary = training_summary(metrics)
                if bar:
                    bar.update(step, loss_ema, tok_s, progress_text(blocks_summary))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                last_metrics = evaluate(step)
                wrapped.train()
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
        loader.shutdown(wait=True, cancel_futures=True)
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
