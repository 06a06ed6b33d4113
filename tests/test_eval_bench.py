"""`hybridlab eval` and `hybridlab bench model` end to end on a tiny run (CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlab.train import prepare, train
from tests.runs_helpers import write_arch

ROOT = Path(__file__).parent.parent


def hl(*args):
    return subprocess.run([sys.executable, "-m", "hybridlab", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_eval_writes_metrics_curve_plot_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = prepare(str(write_arch(tmp_path, tmp_path / "runs", steps=3, eval_every=0)), overrides={"run_name": "e"})
    train(run, quiet=True)
    r = hl("eval", str(run.run_dir), "--batches", "2", "--max-factor", "4", "--contexts", "64,128")
    assert r.returncode == 0, r.stderr
    out = run.run_dir / "eval" / "step_0000003"
    results = json.loads((out / "eval.json").read_text())
    assert [row["context"] for row in results["ppl_vs_context"]] == [32, 64, 128]
    assert all(row["ppl"] > 1 for row in results["ppl_vs_context"])
    assert [row["context"] for row in results["inference"]] == [64, 128]
    assert results["inference"][0]["cache_bytes"] == results["inference"][1]["cache_bytes"]  # window-bounded
    assert (out / "ppl_vs_context.png").stat().st_size > 1000
    acc = EventAccumulator(str(run.run_dir))
    acc.Reload()
    assert {"eval/ppl_vs_context", "eval/loss", "eval/decode_ms_per_token_vs_context", "eval/loss_off",
            "blocks/layers.2.sal/eval_selected_frac"} <= set(acc.Tags()["scalars"])
    assert "eval/ppl_vs_context" in acc.Tags()["images"]
    assert "blocks/layers.2.sal/p_select" in acc.Tags()["histograms"]
    # the SAL's diagnostics: training share (last logged), inference share, off alone
    sal = results["blocks"]["layers.2.sal"]
    assert sal["training_step"] == 3 and 0 <= sal["training"]["selected_frac"] <= 1
    assert 0 <= sal["validation"]["eval_selected_frac"] <= 1
    hist = sal["histograms"]["p_select"]  # P(select) of every validation token: 2 batches of 4 x 32
    assert sum(hist["counts"]) == 2 * 4 * 32 and 0 <= hist["min"] <= hist["median"] <= hist["max"] <= 1
    assert sal["off_alone"]["loss"] == results["validation"]["val/loss_off"]  # the only SAL
    assert "layers.2.sal" in r.stdout and "turned off" in r.stdout
    assert results["selection_page"] == "selection.html"
    assert "<section id='layers.2.sal'>" in (out / "selection.html").read_text()


def test_eval_on_a_recall_task_reports_accuracy_per_difficulty(tmp_path):
    data = {"task": "mqar", "num_kv_pairs": 4, "vocab_size": 64, "eval_examples": 16}
    run = prepare(str(write_arch(tmp_path, tmp_path / "runs", steps=2, eval_every=0, data=data)),
                  overrides={"run_name": "m"})
    train(run, quiet=True)
    r = hl("eval", str(run.run_dir), "--batches", "1", "--max-factor", "2", "--contexts", "32")
    assert r.returncode == 0, r.stderr
    assert "recall accuracy kv=4" in r.stdout and "answer accuracy" in r.stdout
    assert "with every block that can be turned off, off" in r.stdout and "eval_answer_selected_frac" in r.stdout


def test_bench_model_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    r = hl("bench", "model", "experiments/taipan-tiny.yaml", "--batch", "1", "--seq-len", "16", "--steps", "1",
           "--contexts", "32,64", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["train"]["tokens_per_s"] > 0
    assert [row["context"] for row in result["decode"]] == [32, 64]
    assert "decode ms/token" in r.stdout


def test_bench_model_compile_times_training_eager_and_compiled(monkeypatch):
    """--compile: a second training row through torch.compile (stubbed: the model as is)."""
    from pathlib import Path

    from hybridlab.benchmarks import model as bench

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    arch = Path(__file__).parent.parent / "experiments" / "taipan-tiny.yaml"
    result = bench.bench_model(str(arch), batch=1, seq_len=16, contexts="32", steps=1, device="cpu",
                               anchors=False, compile=True)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert result["train"]["tokens_per_s"] > 0 and result["train_compiled"]["tokens_per_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_kernels_needs_cuda_and_says_so():
    r = hl("bench", "kernels")
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr


def test_mamba2_block_benchmark_runs_at_tiny_shape():
    from hybridlab.benchmarks.mamba2_block import run

    (row,) = run(batch=1, seq_len=40, d_model=32, d_state=8, headdim=8, chunk=16, device="cpu")
    assert row["block_fwd_bwd_ms"] > 0 and row["scan_fwd_bwd_ms"] > 0


def test_first_answer_accuracy_counts_each_sequences_first_target_only():
    import torch

    from hybridlab.validation import _loss_and_hits

    V = 5
    targets = torch.full((3, 6), -100)
    targets[0, [1, 4]] = torch.tensor([2, 3])
    targets[1, [0, 2, 5]] = torch.tensor([1, 1, 4])
    # row 2: no target at all
    pred = torch.zeros(3, 6, dtype=torch.long)
    pred[0, 1], pred[0, 4] = 0, 3          # first wrong, second right
    pred[1, 0], pred[1, 2], pred[1, 5] = 1, 0, 4  # first right
    logits = torch.nn.functional.one_hot(pred, V).float() * 10
    _, hits, count, first_hits, firsts = _loss_and_hits(logits, targets)
    assert (hits, count) == (3, 5)
    assert (first_hits, firsts) == (1, 2)


def test_llama_anchor_is_our_transformer_at_the_same_size_and_is_timed_side_by_side():
    """The anchor `bench model` times beside a Llama-shaped graph is transformers' Llama with
    exactly our parameter count (same widths, heads, SwiGLU, tying), and the table has a row
    per measurement with a ratio from the same run."""
    pytest.importorskip("transformers")
    import torch

    from hybridlab.benchmarks.anchors import anchors_for, time_anchor
    from hybridlab.benchmarks.model import side_by_side
    from hybridlab.graph import load_arch
    from hybridlab.model import HybridLM

    arch = load_arch(str(ROOT / "experiments" / "transformerpp-tiny.yaml"))
    found, skipped = anchors_for(arch)
    assert [a.name for a in found] == ["HF Llama (SDPA)"] and "no Mamba-2 blocks" in skipped[0]
    llama = found[0].build()
    assert sum(p.numel() for p in llama.parameters()) == HybridLM(arch).num_params()
    got = time_anchor(found[0], batch=1, seq_len=16, steps=1, contexts=[32], device=torch.device("cpu"), amp=None,
                      decode_steps=2)
    assert got["train"]["tokens_per_s"] > 0 and got["decode"][0]["decode_ms_per_token"] > 0
    ours = {"batch": 1, "seq_len": 16, "train": {"tokens_per_s": 2 * got["train"]["tokens_per_s"]},
            "decode": [{"context": 32, "prefill_tokens_per_s": 1.0, "decode_ms_per_token": 1.0}], "anchors": [got]}
    table = side_by_side(ours)
    assert len(table) == 4 and "2.00x" in table[1]
