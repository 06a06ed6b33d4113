"""The shipped SAL defaults select about C at inference after training (issue 14's CPU check).

A tiny Taipan with experiments/taipan-tiny.yaml's own SAL settings trains on the embedded corpus;
at validation its SAL must select a share within ±50% of C, where the paper's literal rule
(s1 > s0) applied to the same trained gate selects next to nothing.
"""
from pathlib import Path

import torch
import yaml

from hybridlab.train import prepare, train

ROOT = Path(__file__).parent.parent


def test_shipped_defaults_select_about_capacity_at_inference(tmp_path):
    shipped = yaml.safe_load((ROOT / "experiments" / "taipan-tiny.yaml").read_text())
    sal = shipped["defaults"]["sal"]
    arch = {"name": "tiny-defaults", "d_model": 32, "vocab_size": 256, "pattern": "M M S",
            "defaults": {"mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 16},
                         "sal": {**sal, "head_dim": 8, "window": 16}},
            "training": {"data": "default", "seq_len": 64, "batch_size": 8, "steps": 150,
                         "lr": 3e-3, "warmup_steps": 15, "log_every": 50, "eval_every": 0,
                         "eval_batches": 4, "checkpoint_every": 0, "runs_dir": str(tmp_path)}}
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    torch.manual_seed(0)
    run = prepare(str(path), overrides={"run_name": "r"})
    summary = train(run, quiet=True)

    C = sal["capacity"]
    share = summary["val/selected_frac"]
    assert 0.5 * C <= share <= 1.5 * C, share

    # The same trained gate under the paper's literal rule: far below C (the SAL would be off).
    from hybridlab.load import load_checkpoint

    model = load_checkpoint(str(run.run_dir), "cpu", None).model.eval()
    block = model.layers[2]
    x = torch.randint(0, 256, (8, 64))
    with torch.no_grad():
        h = model.embed(x)
        for layer in model.layers[:2]:
            h = layer(h)
        s = block.gate(block.norm(h)).float()
    literal = (s[..., 1] > s[..., 0]).float().mean().item()
    assert literal < C / 3, literal
