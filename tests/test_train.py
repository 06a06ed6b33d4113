"""Training: loss falls, exact resume, divergence stops cleanly, interruption keeps the work."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridlab.errors import ConfigError, TrainingDiverged, UserError
from hybridlab.train import lr_at, prepare, train
from hybridlab.train_config import TrainConfig
from tests.runs_helpers import read_metrics, write_arch

ROOT = Path(__file__).parent.parent


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", steps=12)
    whole = prepare(str(arch), overrides={"run_name": "whole"})
    train(whole, quiet=True)
    split = prepare(str(arch), overrides={"run_name": "split"})
    train(split, stop_after=5, quiet=True)  # stops and checkpoints at step 5 (not a multiple of 4)
    resumed = prepare(resume=str(split.run_dir))
    summary = train(resumed, quiet=True)
    assert summary["step"] == 12
    a, b = read_metrics(whole.run_dir), read_metrics(split.run_dir)
    for step in range(1, 13):
        assert a[step]["train/loss"] == b[step]["train/loss"], step  # bit-identical on the CPU
    assert a[12]["val/loss"] == b[12]["val/loss"]
    assert any(k.endswith("/selected_frac") for k in a[12])


def test_loss_falls_on_default_corpus(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", steps=40, eval_every=0, checkpoint_every=0)
    run = prepare(str(arch), overrides={"run_name": "fall"})
    train(run, quiet=True)
    m = read_metrics(run.run_dir)
    first = sum(m[s]["train/ce_loss"] for s in (1, 2, 3)) / 3
    last = sum(m[s]["train/ce_loss"] for s in (38, 39, 40)) / 3
    assert last < first - 1.0, (first, last)


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-6)
    assert lr_at(100, cfg) == pytest.approx(1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from hybridlab.model import HybridLM

    arch = write_arch(tmp_path, tmp_path / "runs", steps=12, checkpoint_every=2)
    run = prepare(str(arch), overrides={"run_name": "nan"})
    real_forward = HybridLM.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        calls["n"] += 1
        if self.training and calls["n"] == 6:  # the 6th training step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(HybridLM, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*step_0000004"):
        train(run, quiet=True)
    latest = (run.run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000004"


def test_sigint_checkpoints_and_resumes(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", steps=100000, checkpoint_every=0, eval_every=0)
    run_dir = tmp_path / "runs" / "intr"
    proc = subprocess.Popen([sys.executable, "-m", "hybridlab", "train", str(arch), "--run-name", "intr"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors").exists()
    resumed = prepare(resume=str(run_dir), overrides={"steps": step + 2})
    assert train(resumed, quiet=True)["step"] == step + 2


def test_training_section_errors(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", lr=-1)
    with pytest.raises(ConfigError, match=r"training.lr: must be > 0"):
        prepare(str(arch))
    arch = write_arch(tmp_path, tmp_path / "runs", stpes=3)
    with pytest.raises(ConfigError, match=r"training.stpes: unknown key.*'steps'"):
        prepare(str(arch))
    arch = write_arch(tmp_path, tmp_path / "runs", data={"task": "mqr"})
    with pytest.raises(ConfigError, match=r"did you mean 'mqar'"):
        train(prepare(str(arch)), quiet=True)
    arch = write_arch(tmp_path, tmp_path / "runs", data={"text": str(tmp_path / "missing.txt")})
    with pytest.raises(UserError, match="missing.txt"):
        train(prepare(str(arch)), quiet=True)
    (tmp_path / "empty.txt").write_text("")
    arch = write_arch(tmp_path, tmp_path / "runs", data={"text": str(tmp_path / "empty.txt")})
    with pytest.raises(UserError, match="empty.txt"):
        train(prepare(str(arch)), quiet=True)


def test_refuses_to_overwrite_a_run(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", steps=2)
    train(prepare(str(arch), overrides={"run_name": "once"}), quiet=True)
    with pytest.raises(UserError, match="--resume"):
        prepare(str(arch), overrides={"run_name": "once"})


def test_cli_train_bad_inputs_exit_cleanly(tmp_path):
    arch = write_arch(tmp_path, tmp_path / "runs", data={"task": "nonsense"})
    r = subprocess.run([sys.executable, "-m", "hybridlab", "train", str(arch)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown task 'nonsense'" in r.stderr and "Traceback" not in r.stderr


def test_next_batch_is_drawn_on_the_loader_thread_while_a_step_trains(tmp_path, monkeypatch):
    """Each step's batch is drawn once, in order, on the data thread, and step s + 1's draw
    runs while step s trains (drawn in the loop, the GPU would idle through every draw): step s
    waits for that draw to have started, which a draw after the step could never do."""
    import threading

    from hybridlab import train as train_mod
    from hybridlab.data.text import TextDataset
    from tests.runs_helpers import write_arch

    steps = 5
    started = [threading.Event() for _ in range(steps)]
    draws = []
    real_draw, real_accumulate = TextDataset.train_batch, train_mod.accumulate

    def draw(self, step, batch_size, seed):
        draws.append((step, threading.current_thread().name))
        started[step].set()
        return real_draw(self, step, batch_size, seed)

    def accumulate(wrapped, micros, dist, step, *a):
        if step + 1 < steps:
            assert started[step + 1].wait(timeout=30), f"step {step + 1} was not being drawn during step {step}"
        return real_accumulate(wrapped, micros, dist, step, *a)

    monkeypatch.setattr(TextDataset, "train_batch", draw)
    monkeypatch.setattr(train_mod, "accumulate", accumulate)
    arch = write_arch(tmp_path, tmp_path / "runs", steps=steps, eval_every=0, checkpoint_every=0)
    train_mod.train(train_mod.prepare(str(arch)), quiet=True)
    assert [step for step, _ in draws] == list(range(steps))
    assert all(name.startswith("hybridlab-data") for _, name in draws)
    assert not any(t.name.startswith("hybridlab-data") for t in threading.enumerate())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loader_draws_into_pinned_memory_on_cuda_only(device):
    """On CUDA the drawn batch is page-locked (a copy from pageable memory synchronises the
    GPU's stream); elsewhere the draw is left as it is. Values unchanged either way."""
    from hybridlab.train import pinned

    def draw(step, batch_size, seed):
        g = torch.Generator().manual_seed(step + seed)
        return torch.randint(0, 50, (batch_size, 8), generator=g), torch.zeros(batch_size, 8, dtype=torch.int32)

    wrapped = pinned(draw, torch.device(device))
    got, want = wrapped(3, 4, 0), draw(3, 4, 0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(t.is_pinned() for t in got) == (device == "cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_peak_memory_is_logged_on_cuda(tmp_path, device):
    """train/peak_memory_gib (this process's peak allocation) at every logged step on CUDA,
    positive and never falling; no such key on the CPU."""
    arch = write_arch(tmp_path, tmp_path / "runs", steps=3, eval_every=0, checkpoint_every=0, device=device)
    run = prepare(str(arch))
    train(run, quiet=True)
    m = read_metrics(run.run_dir)
    peaks = [m[s].get("train/peak_memory_gib") for s in (1, 2, 3)]
    if device == "cpu":
        assert peaks == [None] * 3
    else:
        assert 0 < peaks[0] <= peaks[1] <= peaks[2]
