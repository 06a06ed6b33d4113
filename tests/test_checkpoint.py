"""Checkpoints: killed writers never leave a half-written checkpoint that loads; broken or
foreign checkpoints get clear errors."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridlab import checkpoint as ckpt_io
from hybridlab.errors import UserError
from hybridlab.graph import parse_arch
from hybridlab.model import HybridLM
from tests.runs_helpers import TINY_ARCH, write_arch

ROOT = Path(__file__).parent.parent

WRITER = r"""
import sys, torch
from hybridlab import checkpoint as ckpt_io
from hybridlab.graph import parse_arch
from hybridlab.model import HybridLM
from tests.runs_helpers import TINY_ARCH
arch = parse_arch({**TINY_ARCH, "d_model": 256, "vocab_size": 4096})  # a few MB per checkpoint
model = HybridLM(arch)
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.embed.weight.fill_(float(step))  # each checkpoint's content names its step
    ckpt_io.save_checkpoint(ckpt_io.Path(sys.argv[1]), step, model, {"step": step, "pad": torch.randn(300000)},
                            "name: x\n", keep=3)
    print(step, flush=True)
"""


def test_sigkill_during_writes_never_leaves_a_loadable_half_checkpoint(tmp_path):
    from safetensors.torch import load_file

    root = tmp_path / "ckpts"
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint written
        time.sleep(0.03 + 0.07 * attempt)  # kill at different moments of a write or a prune
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = ckpt_io.resolve(root)
        manifest = ckpt_io.verify(ckpt)  # the newest named checkpoint is whole
        step = manifest["step"]
        weights = load_file(ckpt / "model.safetensors")
        assert torch.all(weights["embed.weight"] == float(step))
        for other in root.glob("step_*"):  # every final-named folder is whole
            ckpt_io.verify(other)


def test_corrupt_checkpoint_is_reported(tmp_path):
    arch = parse_arch(TINY_ARCH)
    model = HybridLM(arch)
    path = ckpt_io.save_checkpoint(tmp_path, 3, model, {"step": 3}, "x: 1\n")
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="broken checkpoint: model.safetensors does not match"):
        ckpt_io.verify(path)


def test_eval_cli_rejects_broken_and_foreign_checkpoints(tmp_path):
    from hybridlab.train import prepare, train

    arch_path = write_arch(tmp_path, tmp_path / "runs", steps=2, eval_every=0)
    run = prepare(str(arch_path), overrides={"run_name": "r"})
    train(run, quiet=True)
    other = tmp_path / "other.yaml"
    other.write_text("name: other\nd_model: 32\nvocab_size: 256\ndefaults: {mamba2: {d_state: 8, headdim: 8}}\n"
                     "pattern: M\n")

    def hl(*args):
        return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    r = hl("eval", str(run.run_dir), "--arch", str(other))
    assert r.returncode == 2 and "not of" in r.stderr and "Traceback" not in r.stderr
    ckpt = ckpt_io.resolve(run.run_dir)
    (ckpt / "state.pt").write_bytes(b"garbage")
    r = hl("eval", str(run.run_dir))
    assert r.returncode == 2 and "broken checkpoint: state.pt" in r.stderr and "Traceback" not in r.stderr
    r = hl("generate", str(tmp_path / "nowhere"), "--prompt", "x")
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
