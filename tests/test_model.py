"""HybridLM: whole-model decoding, auxiliary losses, saving."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlab.graph import load_arch, parse_arch
from hybridlab.model import HybridLM, cache_bytes
from tests.helpers import open_sal_gate

TINY_TAIPAN = {
    "name": "t", "d_model": 32, "vocab_size": 50,
    "defaults": {"mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
                 "sal": {"head_dim": 8, "window": 7}},
    "pattern": "(M*3 S)*2",
}


def taipan(**sal):
    data = dict(TINY_TAIPAN)
    data["defaults"] = {**data["defaults"], "sal": {**data["defaults"]["sal"], **sal}}
    model = HybridLM(parse_arch(data))
    for layer in model.layers:
        if layer.__class__.__name__ == "SALBlock":
            open_sal_gate(layer, scale=1.0)
    return model.eval()


def check_decode(model, L=21):
    idx = torch.randint(0, 50, (2, L))
    with torch.no_grad():
        full = model(idx).logits
        caches = model.allocate_cache(2, L)
        steps = torch.stack([model.step(idx[:, t], caches) for t in range(L)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def test_taipan_decode_equals_forward():
    check_decode(taipan())


def test_taipan_decode_equals_forward_selected_kv_rope():
    check_decode(taipan(kv="selected", positional="rope"))


def test_shipped_tiny_taipan_decodes_like_forward():
    model = HybridLM(load_arch("experiments/taipan-tiny.yaml")).eval()
    for layer in model.layers:
        if layer.__class__.__name__ == "SALBlock":
            open_sal_gate(layer, scale=1.0)
    check_decode(model, L=40)


def test_taipan_cache_does_not_grow_with_context():
    model = taipan()
    assert cache_bytes(model.allocate_cache(1, 1024)) == cache_bytes(model.allocate_cache(1, 1 << 20))


def test_aux_losses_summed_over_sals_and_reported_per_layer():
    model = taipan().train()
    idx = torch.randint(0, 50, (2, 16))
    out = model(idx, idx)
    budgets = {k: v for k, v in out.metrics.items() if k.endswith("/budget_loss")}
    assert sorted(budgets) == ["layers.3.sal/budget_loss", "layers.7.sal/budget_loss"]
    assert torch.allclose(out.aux_loss, sum(budgets.values()))
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    assert {k for k in out.metrics if k.endswith("selected_frac")} == {
        "layers.3.sal/selected_frac", "layers.7.sal/selected_frac"}
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_untied_head_and_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_model, save_model

    arch = parse_arch({**TINY_TAIPAN, "tie_embeddings": False})
    model = HybridLM(arch)
    assert model.head is not None
    save_model(model, str(tmp_path / "m.safetensors"))
    other = HybridLM(arch)
    load_model(other, str(tmp_path / "m.safetensors"))
    idx = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(model.eval()(idx).logits, other.eval()(idx).logits)


def test_model_prefill_in_chunks_equals_forward():
    model = taipan()
    idx = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full = model(idx).logits
        caches = model.allocate_cache(2, 30)
        a = model.prefill(idx[:, :13], caches, all_logits=True)
        b = model.prefill(idx[:, 13:], caches, all_logits=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=1e-4)


KERNEL_MODULES = ("selective_attention", "ssd", "conv1d", "norm", "cross_entropy", "mamba2_mixer")


@pytest.mark.parametrize("through_ops", [False, True], ids=["reference kernels", "kernel custom ops"])
def test_the_model_compiles_as_one_graph_and_matches_eager(monkeypatch, through_ops):
    """torch.compile(fullgraph=True) traces the whole model, forward and backward, with no graph
    break, and gives eager's loss and gradients (aot_eager keeps the test free of a C++ compile).
    On the reference kernels (the CPU's path), and through the kernels' custom ops as on CUDA
    (each kernel call one `hybridlab::` node; here with the reference as the ops' CPU code)."""
    import importlib

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    if through_ops and not os.environ.get("HYBRIDLAB_TEST_FRESH_PROCESS"):
        # In a fresh process: after tests/test_eval_bench.py's run of transformers' Llama (and
        # others) in the same process, dynamo's fake-tensor call of the SSD op failed inside C++
        # (std::bad_alloc, vector::reserve); alone, or first, it passes. Not understood yet.
        node = f"{__file__}::test_the_model_compiles_as_one_graph_and_matches_eager[kernel custom ops]"
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                           env={**os.environ, "HYBRIDLAB_TEST_FRESH_PROCESS": "1"},
                           cwd=Path(__file__).parent.parent, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        return
    if through_ops:  # as on CUDA under torch.compile; the eager run below calls the ops too
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"hybridlab.kernels.{name}")
            monkeypatch.setattr(module, "use_triton", lambda *t: True)
            monkeypatch.setattr(module, "through_op", lambda: True)
    graphs = {}

    def keep(kind):
        def compiler(gm, _):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    arch = load_arch(str(Path(__file__).parent.parent / "experiments" / "taipan-tiny.yaml"))
    torch.manual_seed(0)
    model = HybridLM(arch)
    idx = torch.randint(0, arch.vocab_size, (2, 33))
    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    torch.manual_seed(1)  # the SAL's Gumbel noise
    out = compiled(idx[:, :-1], idx[:, 1:], return_logits=False, step=0)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    ref = model(idx[:, :-1], idx[:, 1:], return_logits=False, step=0)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    ops = {str(n.target).split(".")[1] for n in graphs["forward"].graph.nodes
           if n.op == "call_function" and str(n.target).startswith("hybridlab.")}
    if through_ops:
        assert ops == {"selective_attention", "mamba2_mixer", "gated_rms_norm", "linear_cross_entropy"}
    else:
        assert not ops


@pytest.mark.parametrize("scheduled", [False, True], ids=["fixed capacity", "capacity schedule"])
def test_compiled_model_is_not_recompiled_per_step(scheduled):
    """Training calls the model with a new `step` every step. Without a step-scheduled block the
    model passes none to its blocks, so torch.compile has nothing to specialise on and compiles
    once (it compiled the model three times on CUDA: once for the step == 0 guard, once more for
    the kernels' first Triton import check). With a capacity schedule the step reaches the SAL."""
    import torch._dynamo

    import yaml

    spec = yaml.safe_load((Path(__file__).parent.parent / "experiments" / "taipan-tiny.yaml").read_text())
    spec.pop("training")
    if scheduled:
        spec["defaults"]["sal"].update(capacity_start=0.6, capacity_warmup_steps=10)
    arch = parse_arch(spec)
    model = HybridLM(arch)
    assert model.uses_step == scheduled
    idx = torch.randint(0, arch.vocab_size, (2, 33))
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]
    before = frames["unique_graphs"]
    compiled = torch.compile(model, backend="eager")
    losses = [compiled(idx[:, :-1], idx[:, 1:], return_logits=False, step=s).aux_loss.detach() for s in range(4)]
    compiles = frames["unique_graphs"] - before
    if scheduled:  # the step is read: dynamo makes it dynamic after the second value, no more
        assert compiles <= 2
        assert len({round(l.item(), 6) for l in losses}) > 1  # the budget target moved with it
    else:
        assert compiles == 1


def test_training_compile_option_compiles_the_model(tmp_path, monkeypatch):
    from hybridlab import train as train_mod
    from tests.runs_helpers import write_arch

    compiled = []

    def fake_compile(module, **kw):
        compiled.append(module)
        return module
    monkeypatch.setattr(torch, "compile", fake_compile)
    arch = write_arch(tmp_path, tmp_path / "runs", steps=1, eval_every=0, checkpoint_every=0)
    run = train_mod.prepare(str(arch), overrides={"compile": True})
    train_mod.train(run, quiet=True)
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)


def test_training_compiles_by_default_on_cuda_only(tmp_path, monkeypatch):
    """compile: null (the default) compiles where it measured faster, CUDA; a CPU run stays
    eager (no C++ toolchain needed, no compile time on small CPU runs); true/false force it."""
    from hybridlab import train as train_mod
    from hybridlab.train_config import TrainConfig
    from tests.runs_helpers import write_arch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().compile is None
    assert TrainConfig().compiles(cuda) and not TrainConfig().compiles(cpu)
    assert TrainConfig(compile=True).compiles(cpu) and not TrainConfig(compile=False).compiles(cuda)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    arch = write_arch(tmp_path, tmp_path / "runs", steps=1, eval_every=0, checkpoint_every=0)
    train_mod.train(train_mod.prepare(str(arch)), quiet=True)
    assert compiled == []
