"""Gradient accumulation and data parallelism: micro-batches give one big batch's loss and
gradients; 2 processes under torchrun (DDP and FSDP2, gloo on the CPU) give 1 process's losses;
checkpoints move between process counts and keep the losses."""
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from hybridlab.config import ConfigError
from hybridlab.distributed import Dist, local_micro_batches
from hybridlab.graph import parse_arch
from hybridlab.model import HybridLM
from hybridlab.train import accumulate, check_split, prepare, train
from hybridlab.train_config import TrainConfig, parse_training
from tests.runs_helpers import TINY_ARCH, read_metrics

ROOT = Path(__file__).parent.parent
STEPS = 4  # checkpoints at 2 and 4; runs resumed from 2 must match steps 3-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# TINY_ARCH's blocks with an MLP shared by two layer positions (checkpoints store it once)
ARCH = {**{k: v for k, v in TINY_ARCH.items() if k != "pattern"},
        "layers": [{"block": "mamba2"}, {"block": "mlp", "name": "mlp"}, {"block": "sal"},
                   {"block": "mlp", "share": "mlp"}]}


def _arch(tmp_path: Path) -> Path:
    training = {"data": "default", "seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "steps": STEPS,
                "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "eval_batches": 1,
                "checkpoint_every": 2, "keep_checkpoints": 3, "device": "cpu", "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({**ARCH, "training": training}, sort_keys=False))
    return path


def _rewind(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of a run as if it had stopped after checkpoint `step`."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    return to


def _assert_same_losses(a: Path, b: Path, steps, rel=1e-5):
    ma, mb = read_metrics(a), read_metrics(b)
    for step in steps:
        assert ma[step]["train/loss"] == pytest.approx(mb[step]["train/loss"], rel=rel), (a.name, b.name, step)
        assert ma[step]["train/grad_norm"] == pytest.approx(mb[step]["train/grad_norm"], rel=1e-4), (a.name, step)


# torchrun runs this: the CLI as `python -m hybridlab train` would, three runs in one launch
# (each launch costs seconds of start-up on a small CPU)
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch.distributed
    from hybridlab.cli import main
    from tests.test_distributed import _rewind
    arch, runs = sys.argv[1], Path(sys.argv[2])
    assert main(["train", arch, "--run-name", "ddp"]) == 0
    assert main(["train", arch, "--run-name", "fsdp", "--set", "parallel=fsdp"]) == 0
    assert main(["train", "--resume", str(runs / "one-to-fsdp"), "--set", "parallel=fsdp"]) == 0
    if torch.distributed.get_rank() == 0:
        _rewind(runs / "fsdp", runs / "fsdp-to-ddp", 2)
    torch.distributed.barrier()
    assert main(["train", "--resume", str(runs / "fsdp-to-ddp"), "--set", "parallel=ddp"]) == 0
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (here); on 2 processes (torchrun, gloo) DDP, FSDP2, the one-process run
    resumed from step 2 by FSDP2 and the FSDP2 run resumed from step 2 by DDP; then each
    2-process run resumed from step 2 on one process."""
    tmp = tmp_path_factory.mktemp("dist")
    arch = _arch(tmp)
    root = tmp / "runs"
    train(prepare(str(arch), overrides={"run_name": "one"}), quiet=True)
    _rewind(root / "one", root / "one-to-fsdp", 2)
    script = tmp / "launch.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                        str(script), str(arch), str(root)],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("ddp", "fsdp"):
        train(prepare(resume=str(_rewind(root / name, root / f"{name}-to-one", 2))), quiet=True)
    return root, r


def test_two_processes_give_one_process_losses(runs):
    root, r = runs
    for name in ("ddp", "fsdp"):
        _assert_same_losses(root / name, root / "one", range(1, STEPS + 1))
    # rank 0 alone prints and logs: one line per run, one metrics row per step
    assert r.stdout.count("done: step") == 4 and r.stdout.count("training tiny") == 2
    rows = (root / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"train/loss"' in row for row in rows) == STEPS


def test_checkpoints_resume_on_another_process_count(runs):
    root, _ = runs
    ddp = torch.load(root / "ddp" / "checkpoints" / "step_0000002" / "state.pt", weights_only=True)
    assert ddp["world_size"] == 2 and "optimizer" in ddp  # DDP: today's format, written by rank 0
    fsdp = root / "fsdp" / "checkpoints" / "step_0000002"
    assert (fsdp / "dcp" / ".metadata").exists() and len(list((fsdp / "dcp").glob("*.distcp"))) == 2
    assert (fsdp / "model.safetensors").exists()  # full weights too, for eval and generate
    steps = range(3, STEPS + 1)
    _assert_same_losses(root / "ddp-to-one", root / "ddp", steps)
    _assert_same_losses(root / "fsdp-to-one", root / "fsdp", steps)
    _assert_same_losses(root / "one-to-fsdp", root / "one", steps)  # and between DDP and FSDP2
    _assert_same_losses(root / "fsdp-to-ddp", root / "fsdp", steps)


def test_micro_batches_give_one_batch_loss_and_gradients(monkeypatch):
    """4 micro-batches of a step with uneven target counts: the loss and every gradient of one
    batch. The SAL's Gumbel noise is made a plain argmax here (noise differs between a batch and
    its parts: it is drawn per micro-batch); its budget loss keeps its straight-through gradient."""
    def no_noise(logits, tau=1.0, hard=False):
        soft = torch.softmax(logits / tau, dim=-1)
        one_hot = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return one_hot - soft.detach() + soft

    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", no_noise)
    arch = parse_arch({**TINY_ARCH, "defaults": {**TINY_ARCH["defaults"],
                                                 "sal": {"head_dim": 8, "window": 16, "signal": "selected"}}})
    model = HybridLM(arch).train()
    inputs = torch.randint(0, 256, (8, 32))
    targets = torch.randint(0, 256, (8, 32))
    targets[0, :30] = -100  # micro-batches of 2 rows: 34, 64, 36 and 64 target tokens
    targets[5, 4:] = -100
    out = model(inputs, targets, return_logits=False, step=0)
    out.loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micros = local_micro_batches((inputs, targets), Dist(), 2)
    assert [m[0].shape[0] for m in micros] == [2, 2, 2, 2]
    sums, _ = accumulate(model, micros, Dist(), 0, int((targets != -100).sum()), 4, None, 0)
    assert sums[0].item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert sums[1].item() == pytest.approx(out.ce_loss.item(), rel=1e-6)
    assert out.aux_loss.item() > 0 and sums[2].item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, whole[name], rtol=1e-4, atol=1e-7), name


def test_fsdp_bf16_weights_keep_the_blocks_auxiliary_losses(tmp_path):
    """FSDP2 with bf16 weights (as on CUDA) in a one-process group: the SAL's budget loss and
    metrics still reach the model's output (casting a unit's inputs would copy its Aux)."""
    import torch.distributed as tdist

    from hybridlab.distributed import wrap

    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = wrap(HybridLM(parse_arch(TINY_ARCH)), Dist(active=True), "fsdp", torch.bfloat16)
        assert type(model).__name__.startswith("FSDP")
        idx = torch.randint(0, 256, (2, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, idx, return_logits=False, step=0)
        assert out.aux_loss.item() > 0 and "layers.2.sal/budget_loss" in out.metrics
        out.loss.backward()
        assert model.embed.weight.grad is not None and model.embed.weight.dtype == torch.float32
    finally:
        tdist.destroy_process_group()


def test_rank_takes_its_rows_then_micro_batches():
    batch = (torch.arange(8)[:, None].expand(8, 3), torch.arange(8)[:, None].expand(8, 3) + 100)
    parts = local_micro_batches(batch, Dist(rank=1, world=2), 2)
    assert [p[0][:, 0].tolist() for p in parts] == [[4, 5], [6, 7]]
    assert [p[1][:, 0].tolist() for p in parts] == [[104, 105], [106, 107]]


def test_batch_settings_are_checked():
    cfg, _ = parse_training({"seq_len": 64, "tokens_per_step": 1024})
    assert cfg.global_batch() == 16 and cfg.total_steps() == cfg.steps
    cfg, _ = parse_training({"seq_len": 64, "tokens_per_step": 1024, "tokens": 1024 * 50, "steps": None})
    assert cfg.total_steps() == 50
    with pytest.raises(ConfigError, match=r"x.yaml: training.tokens_per_step: must be a multiple of seq_len \(64\)"):
        parse_training({"seq_len": 64, "tokens_per_step": 1000}, None, "x.yaml")
    with pytest.raises(ConfigError, match=r"training.micro_batch_size: must divide the step's 16 sequences"):
        parse_training({"seq_len": 64, "tokens_per_step": 1024, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match=r"training.batch_size: the step's 6 sequences do not split evenly over 4"):
        check_split(TrainConfig(batch_size=6), 4, None)
    with pytest.raises(ConfigError, match=r"training.micro_batch_size: each of 2 processes takes 4"):
        check_split(TrainConfig(batch_size=8, micro_batch_size=8), 2, 8)
    check_split(TrainConfig(batch_size=8, micro_batch_size=2), 2, 2)


def test_sweep_workers_pin_one_gpu_each(monkeypatch):
    from hybridlab.sweep.study import worker_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_gpu(i, 4) for i in range(5)] == ["0", "1", "2", "3", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [worker_gpu(i, 2) for i in range(3)] == ["2", "3", "2"]
