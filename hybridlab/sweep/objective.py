"""One trial: sample a point, check analytic constraints, train, measure, return the objectives.

A trial that raises, runs out of memory, diverges or yields a NaN objective returns NaNs, which
Optuna records as FAIL; the reason goes to the trial's `fail_reason` attribute (and a traceback
to RUN/error.txt) and the study goes on. A trial whose analytic constraint fails is PRUNED before
it trains, with the reason in the same attribute.
"""
from __future__ import annotations

import math
import shutil
import time
import traceback
from functools import partial
from pathlib import Path

import optuna

from .space import METRICS, SearchSpace

ANALYTIC = ("params", "flops_per_token", "state_bytes")


def _train(run, warn=None) -> dict:
    """The training call, a seam for tests (monkeypatched to raise or return NaN)."""
    from hybridlab.train import train

    return train(run, quiet=True, warn=warn)


def analytic_metrics(space: SearchSpace, arch) -> dict:
    from hybridlab.analysis import flops_per_token, num_params, state_bytes

    seq_len = space.training.get("seq_len", 256)
    return {"params": num_params(arch), "flops_per_token": flops_per_token(arch, seq_len),
            "state_bytes": state_bytes(arch, space.measure["context"])}


def measured_metrics(space: SearchSpace, run_dir: Path) -> dict:
    """Prefill and decode latency of the trained model, batch 1, after measure.context tokens."""
    import torch

    from hybridlab.evaluate import inference_cost
    from hybridlab.load import load_checkpoint

    lo = load_checkpoint(run_dir)
    device = next(lo.model.parameters()).device
    amp = torch.bfloat16 if device.type == "cuda" else None
    rows = []
    for _ in range(space.measure["repeats"]):
        row = inference_cost(lo.model, [space.measure["context"]], batch=1,
                             decode_steps=space.measure["decode_steps"], device=device, amp=amp)[0]
        if "stopped" in row:
            raise RuntimeError(f"latency measurement stopped: {row['stopped']}")
        rows.append(row)
    # the best of a few repeats: other processes (a second worker, the OS) only ever add time
    return {"decode_ms": min(r["decode_ms_per_token"] for r in rows),
            "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in rows)}


def sweep_metric_keys(space: SearchSpace) -> list[str]:
    """Metrics every trial logs (the same keys for every trial, for the HParams dashboard)."""
    keys = list(ANALYTIC) + [o.metric for o in space.objectives] + [c.metric for c in space.constraints]
    return list(dict.fromkeys(keys))


def _reason(err: BaseException) -> str:
    from hybridlab.errors import TrainingDiverged

    if isinstance(err, TrainingDiverged):
        return f"diverged: {err}"
    text = str(err).splitlines()[0] if str(err) else ""
    if "out of memory" in text.lower() or type(err).__name__ == "OutOfMemoryError":
        return f"out of memory: {text[:200]}"
    return f"{type(err).__name__}: {text[:300]}"


class Objective:
    """Callable for `study.optimize`. `on_start(trial)` runs first (the worker claims the trial
    and releases the ask lock there)."""

    def __init__(self, space: SearchSpace, on_start=None, log=print):
        self.space, self.on_start, self.log = space, on_start, log
        self.runs_dir = space.folder / "runs"

    def __call__(self, trial):
        # Parameters first, then claim (on_start releases the ask lock): a worker killed after
        # claiming leaves a stale trial with all its parameters, which is then retried as is.
        params = {p.path: p.suggest(trial) for p in self.space.params}
        if self.on_start:
            self.on_start(trial)
        t0 = time.perf_counter()
        n_obj = len(self.space.objectives)
        run_dir = self.runs_dir / f"trial-{trial.number:04d}"
        try:
            values, metrics = self._run(trial, run_dir, params)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            self._requeue(trial, "interrupted (Ctrl-C)")
            raise
        except Exception as err:  # noqa: BLE001 - any failure of one trial is recorded, not fatal
            from hybridlab.errors import TrainingInterrupted

            if isinstance(err, TrainingInterrupted):
                self._requeue(trial, "interrupted (Ctrl-C)")  # train() turns Ctrl-C into this
                raise KeyboardInterrupt from None
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc())
            self._cleanup_cuda()
            return self._fail(trial, _reason(err), n_obj, {})
        bad = [(o.metric, v) for o, v in zip(self.space.objectives, values) if v is None or not math.isfinite(v)]
        if bad:
            return self._fail(trial, f"objective {bad[0][0]} is {bad[0][1]}", n_obj, metrics)
        shown = ", ".join(f"{o.metric} {v:.4g}" for o, v in zip(self.space.objectives, values))
        infeasible = [c.describe() for c in self.space.constraints if c.excess(metrics[c.metric]) > 0]
        self.log(f"[trial {trial.number}] {shown} ({time.perf_counter() - t0:.0f} s)"
                 + (f"; infeasible: {', '.join(infeasible)}" if infeasible else ""))
        return values

    # ------------------------------------------------------------------ the trial itself

    def _run(self, trial, run_dir: Path, values: dict):
        space = self.space
        arch, training = space.build(values, name=f"{space.base_dict['name']}-trial-{trial.number}")
        trial.set_user_attr("pattern", arch.pattern())
        trial.set_user_attr("arch_hash", arch.arch_hash())
        metrics = analytic_metrics(space, arch)
        for c in space.constraints:
            if METRICS[c.metric].kind == "analytic":
                trial.set_constraint(c.describe(), c.excess(metrics[c.metric]))
        broken = [c for c in space.constraints if METRICS[c.metric].kind == "analytic"
                  and c.excess(metrics[c.metric]) > 0]
        if broken:
            c = broken[0]
            reason = f"infeasible before training: {c.metric} = {metrics[c.metric]:.4g}, needs {c.describe()}"
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("fail_reason", reason)
            self._log_hparams(trial, values, metrics)
            self.log(f"[trial {trial.number}] pruned: {reason}")
            raise optuna.TrialPruned(reason)

        from hybridlab.diagnostics import print_warnings
        from hybridlab.train import prepare_new

        if run_dir.exists():  # a trial number is used once per study: a leftover of a deleted study
            shutil.rmtree(run_dir)
        training = {**training, "runs_dir": str(self.runs_dir), "run_name": run_dir.name}
        run = prepare_new(arch, training, {}, f"{space.source}: trial {trial.number}", space.base_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        # the blocks' warnings at each validation (e.g. one effectively off), named by trial
        summary = _train(run, warn=partial(print_warnings, prefix=f"[trial {trial.number}] "))
        metrics.update({"val_loss": summary.get("val/loss", math.nan), "val_ppl": summary.get("val/ppl", math.nan),
                        "recall_acc": summary.get("val/acc", math.nan), "train_loss": summary.get("train_loss", math.nan),
                        "tokens_per_s": summary.get("tokens_per_s", math.nan)})
        if space.needs("measured"):
            metrics.update(measured_metrics(space, run_dir))
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        for c in space.constraints:
            if METRICS[c.metric].kind != "analytic":
                trial.set_constraint(c.describe(), c.excess(metrics[c.metric]))
        trial.set_user_attr("metrics", metrics)
        self._log_scalars(run_dir, summary.get("step", 0), metrics)
        self._log_hparams(trial, values, metrics)
        return [metrics.get(o.metric, math.nan) for o in space.objectives], metrics

    # ------------------------------------------------------------------ bookkeeping

    def _fail(self, trial, reason: str, n_obj: int, metrics: dict):
        trial.set_user_attr("fail_reason", reason)
        self._log_hparams(trial, {p.path: trial.params.get(p.path) for p in self.space.params}, metrics)
        self.log(f"[trial {trial.number}] FAILED: {reason}")
        return [math.nan] * n_obj  # Optuna records a NaN objective as FAIL

    def _requeue(self, trial, reason: str) -> None:
        """An interrupted trial is not the architecture's fault: run its point again on resume."""
        trial.set_user_attr("fail_reason", f"{reason}; its parameters are queued again")
        trial.set_user_attr("retried", True)
        trial.study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})

    def _log_scalars(self, run_dir: Path, step: int, metrics: dict) -> None:
        from hybridlab.tracking import Tracker

        tracker = Tracker(run_dir)
        tracker.log(step, {f"sweep/{k}": metrics.get(k, math.nan) for k in sweep_metric_keys(self.space)})
        tracker.close()

    def _log_hparams(self, trial, values: dict, metrics: dict) -> None:
        """The sweep's own HParams table (<sweep>/hparams/trial-N): the swept paths as hparams,
        objectives and constraint metrics as metrics; identical keys for every trial."""
        from torch.utils.tensorboard import SummaryWriter

        hp = {"trial": trial.number}
        for p in self.space.params:
            v = values.get(p.path)
            hp[p.path] = v if isinstance(v, (int, float, str, bool)) else str(v)
        writer = SummaryWriter(log_dir=str(self.space.folder / "hparams" / f"trial-{trial.number:04d}"))
        writer.add_hparams(hp, {f"sweep/{k}": metrics.get(k, math.nan) for k in sweep_metric_keys(self.space)},
                           run_name=".")
        writer.close()

    @staticmethod
    def _cleanup_cuda() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
