"""Hugging Face interop: import (transformers Mamba2 / Llama, mamba_ssm), export (Mamba2, Llama,
HybridlabForCausalLM), upcycling Mamba-2 with SALs, and the training keys it needs.

Tiny random models, CPU, fp32, offline: every model is written to a local folder first.
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from hybridlab.config import ConfigError  # noqa: E402
from hybridlab.errors import UserError  # noqa: E402
from hybridlab.generate import generate  # noqa: E402
from hybridlab.load import load_checkpoint  # noqa: E402

from helpers import rel_err  # noqa: E402

ROOT = Path(__file__).parent.parent
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def randomize_norms(model):
    """Norm weights start at 1; make them matter, so a norm mapped to the wrong place shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def hf_greedy(model, prompt, n=10):
    model.generation_config.eos_token_id = None  # random weights: no token means "stop"
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def ours_greedy(model, prompt, n=10):
    return generate(model, prompt, n, temperature=0)[:, prompt.shape[1]:]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def mamba2_src(tmp_path_factory):
    """transformers' Mamba2ForCausalLM, untied, two B/C groups, saved as safetensors."""
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=16,
                                    head_dim=16, num_heads=4, expand=2, n_groups=2, chunk_size=16,
                                    tie_word_embeddings=False)
    model = randomize_norms(transformers.Mamba2ForCausalLM(cfg)).eval()
    folder = tmp_path_factory.mktemp("hf") / "mamba2"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def mamba2_imported(mamba2_src, tmp_path_factory):
    from hybridlab.pretrained.importer import import_model

    out = tmp_path_factory.mktemp("hf") / "mamba2-imported"
    import_model(mamba2_src[0], out)
    return out


def test_mamba2_import_gives_transformers_logits_and_tokens(mamba2_src, mamba2_imported):
    from hybridlab.graph import load_arch

    theirs = mamba2_src[1]
    ours = load_checkpoint(mamba2_imported, device="cpu").model
    x = torch.randint(0, 256, (2, 40))  # 40: not a multiple of the chunk (16)
    assert rel_err(logits(ours, x), logits(theirs, x)) < 1e-5
    prompt = x[:1, :12]
    assert torch.equal(ours_greedy(ours, prompt), hf_greedy(theirs, prompt))
    arch = load_arch(mamba2_imported / "arch.yaml")  # what `train` reads
    assert arch.pattern() == "MM" and arch.layers[0].config.ngroups == 2
    assert "init_from: checkpoints/step_0000000" in (mamba2_imported / "arch.yaml").read_text()


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def llama(folder, tied, rope_scaling, kv_heads):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                   tie_word_embeddings=tied, rope_theta=500.0, rope_scaling=rope_scaling)
    model = randomize_norms(transformers.LlamaForCausalLM(cfg)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tied,scaling,kv_heads", [(True, LLAMA3, 2), (False, None, 1)],
                         ids=["tied-gqa-llama3", "untied-mqa"])
def test_llama_import_gives_transformers_logits_and_tokens(tmp_path, tied, scaling, kv_heads):
    from hybridlab.graph import parse_arch
    from hybridlab.pretrained.importer import import_model
    from hybridlab.model import HybridLM

    theirs = llama(tmp_path / "llama", tied, scaling, kv_heads)
    import_model(tmp_path / "llama", tmp_path / "out")
    lo = load_checkpoint(tmp_path / "out", device="cpu")
    assert lo.arch.pattern() == "AFAF" and lo.arch.tie_embeddings == tied
    x = torch.randint(0, 128, (2, 48))  # past original_max_position_embeddings: scaling matters
    ref = logits(theirs, x)
    assert rel_err(logits(lo.model, x), ref) < 1e-5
    prompt = x[:1, :12]
    assert torch.equal(ours_greedy(lo.model, prompt), hf_greedy(theirs, prompt))
    if scaling:  # the comparison sees the scaling: without it the logits move
        plain = lo.arch.to_dict()
        for layer in plain["layers"]:
            layer.pop("rope_scaling", None)
        unscaled = HybridLM(parse_arch(plain)).eval()
        unscaled.load_state_dict(lo.model.state_dict())
        assert rel_err(logits(unscaled, x), ref) > 1e-3


def test_mamba_ssm_folder_imports_like_transformers(tmp_path):
    """mamba_ssm's MambaLMHeadModel layout, written by hand: config.json with ssm_cfg, a
    pickled state dict named backbone.embedding / backbone.layers.N.mixer.*, the vocabulary
    padded to pad_vocab_size_multiple, lm_head tied (and saved, as torch.save does)."""
    from hybridlab.pretrained.importer import import_model

    torch.manual_seed(2)
    cfg = transformers.Mamba2Config(vocab_size=104, hidden_size=32, num_hidden_layers=2, state_size=16,
                                    head_dim=16, num_heads=4, expand=2, n_groups=1, chunk_size=16,
                                    tie_word_embeddings=True)
    theirs = randomize_norms(transformers.Mamba2ForCausalLM(cfg)).eval()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in theirs.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    src = tmp_path / "mamba_ssm"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": 100,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}))
    import_model(src, tmp_path / "out")
    lo = load_checkpoint(tmp_path / "out", device="cpu")
    assert lo.arch.vocab_size == 104 and lo.arch.tie_embeddings
    x = torch.randint(0, 100, (2, 33))
    assert rel_err(logits(lo.model, x), logits(theirs, x)) < 1e-5


def test_export_round_trips_to_mamba2_and_llama(mamba2_src, mamba2_imported, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from hybridlab.hf.exporter import export_model
    from hybridlab.pretrained.importer import import_model

    out, kind, _ = export_model(mamba2_imported, tmp_path / "m2")
    assert kind == "mamba2"
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "Mamba2ForCausalLM"
    x = torch.randint(0, 256, (2, 24))
    assert rel_err(logits(back, x), logits(mamba2_src[1], x)) < 1e-6

    theirs = llama(tmp_path / "llama", True, LLAMA3, 2)
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "def": 1, "return": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "llama" / "tokenizer.json"))
    import_model(tmp_path / "llama", tmp_path / "imported")
    assert load_checkpoint(tmp_path / "imported", device="cpu").data_spec == {
        "text": "default", "tokenizer": "tokenizer.json"}  # training reads through it
    out, kind, _ = export_model(tmp_path / "imported", tmp_path / "ll")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert kind == "llama" and type(back).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 128, (2, 48))
    assert rel_err(logits(back, x), logits(theirs, x)) < 1e-6
    assert transformers.AutoTokenizer.from_pretrained(out)("def return x").input_ids == [1, 2, 0]


def save_model_folder(model, folder):
    from hybridlab.checkpoint import save_checkpoint
    import yaml

    config = {**model.arch.to_dict(), "training": {"data": "default"}}
    save_checkpoint(folder / "checkpoints", 0, model, {"step": 0}, yaml.safe_dump(config), keep=1)


def test_export_taipan_loads_with_automodel_and_generates(tmp_path):
    """A hybrid (Mamba-2, SAL, Mamba-2, SAL) becomes HybridlabForCausalLM; AutoModelForCausalLM
    loads it (after import hybridlab.hf), with hybridlab's logits and greedy tokens."""
    import hybridlab.hf  # noqa: F401  registers model_type hybridlab
    from hybridlab.graph import parse_arch
    from hybridlab.hf.exporter import export_model
    from hybridlab.model import HybridLM

    from helpers import open_sal_gate

    arch = parse_arch({"name": "taipan-hf", "d_model": 32, "vocab_size": 64, "pattern": "MSMS",
                       "defaults": {"mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8},
                                    "sal": {"head_dim": 8, "window": 8, "capacity": 0.5}}})
    model = HybridLM(arch).eval()
    for block in model.layers:
        if hasattr(block, "gate"):
            open_sal_gate(block)
            block.select_threshold.fill_(0.0)  # select about half: the attention matters
    save_model_folder(model, tmp_path / "run")
    out, kind, note = export_model(tmp_path / "run", tmp_path / "hf")
    assert kind == "hybridlab" and "not every layer is mamba2" in note
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "HybridlabForCausalLM"
    x = torch.randint(0, 64, (2, 20))
    assert torch.allclose(logits(hf, x), logits(model, x), atol=1e-6, rtol=0)
    prompt = x[:1, :8]
    assert torch.equal(hf_greedy(hf, prompt, 6), ours_greedy(model, prompt, 6))


def apply_train_patch(monkeypatch, run):
    """What hybridlab/train.py does once the patch proposed for it is in (init_from, freeze,
    lr_multipliers through hybridlab/finetune.py), applied here from outside while it is not:
    the model `train` builds is loaded and frozen, its optimizer groups come from finetune."""
    import hybridlab.model as model_module
    import hybridlab.train as train_module
    from hybridlab import finetune

    if "init_from" in inspect.getsource(train_module.train):
        return
    cfg, real = run.cfg, model_module.HybridLM

    def build(arch):
        model = real(arch)
        finetune.load_init(model, cfg.init_from, run.base_dir)
        finetune.freeze(model, arch, cfg.freeze)
        return model

    monkeypatch.setattr(model_module, "HybridLM", build)
    monkeypatch.setattr(train_module, "param_groups", lambda model, wd: finetune.param_groups(
        model, run.arch, wd, cfg.lr, cfg.lr_multipliers))


def test_upcycle_keeps_outputs_then_trains_sal_to_its_capacity(mamba2_imported, tmp_path, monkeypatch):
    from hybridlab.data import make_dataset
    from hybridlab.pretrained.upcycle import upcycle
    from hybridlab.train import prepare, train

    C = 0.25
    path, arch, added = upcycle(mamba2_imported, tmp_path / "up", every=2,
                                settings={"capacity": C, "window": 16, "head_dim": 16})
    assert arch.pattern() == "MMS" and added == [2]
    source = load_checkpoint(mamba2_imported, device="cpu").model
    start = load_checkpoint(tmp_path / "up", device="cpu").model
    x = torch.randint(0, 256, (2, 40))
    assert torch.equal(logits(start, x), logits(source, x))  # step 0: exactly the source

    run = prepare(str(path), overrides={
        "runs_dir": str(tmp_path / "runs"), "run_name": "ft", "steps": 30, "seq_len": 64,
        "batch_size": 8, "lr": 3e-3, "warmup_steps": 4, "eval_every": 0, "eval_batches": 2,
        "checkpoint_every": 0, "device": "cpu", "freeze": ["mamba2"]})
    assert run.cfg.lr_multipliers == {"sal": 10.0}  # what upcycle wrote
    apply_train_patch(monkeypatch, run)
    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train(run, quiet=True, warn=lambda lines: None)

    trained = load_checkpoint(tmp_path / "runs" / "ft", device="cpu").model
    names = dict(trained.named_parameters())
    built, lr = made[0].param_groups, run.cfg.lr
    assert all(g["initial_lr"] in (lr, 10 * lr) for g in built)
    for name, before in start.named_parameters():
        after = names[name]
        if name.startswith(("layers.0.", "layers.1.")):  # mamba2: frozen
            assert torch.equal(after, before), name
        elif name.startswith("layers.2.") and name.endswith(("wo.weight", "w_down.weight")):
            assert after.abs().max() > 0, name  # the zeroed projections learned
    # the optimizer holds the SALs (at 10x lr) and the embedding, never a frozen Mamba-2 weight
    opt_shapes = {(tuple(p.shape), g["initial_lr"]) for g in built for p in g["params"]}
    assert ((32,), 10 * lr) in opt_shapes  # a SAL norm at 10x lr
    assert ((256, 32), lr) in opt_shapes  # the embedding at lr
    n_opt = sum(p.numel() for g in built for p in g["params"])
    n_mamba = sum(p.numel() for n, p in start.named_parameters() if n.startswith(("layers.0.", "layers.1.")))
    assert n_opt == start.num_params() - n_mamba

    data = make_dataset("default", 64)
    tokens = next(iter(data.eval_batches(8, 1)))[0]
    shares = []
    for j in added:
        with trained.layers[j].record() as rec, torch.no_grad():
            trained(tokens)
        shares.append(rec.calls[0][0].float().mean().item())
    assert all(abs(s - C) < 0.1 for s in shares), shares


def test_upcycle_refuses_what_would_change_the_outputs(mamba2_imported, tmp_path):
    from hybridlab.pretrained.upcycle import upcycle

    with pytest.raises(UserError, match="refine=interpolate.*upcycling needs refine: residual"):
        upcycle(mamba2_imported, tmp_path / "a", settings={"refine": "interpolate", "head_dim": 16})
    with pytest.raises(UserError, match="fewer than --every 6"):
        upcycle(mamba2_imported, tmp_path / "b", every=6, settings={"head_dim": 16})
    with pytest.raises(UserError, match=r"--set.capacity: must be in \(0, 1\]"):
        upcycle(mamba2_imported, tmp_path / "c", settings={"capacity": 2, "head_dim": 16})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_keys_are_checked():
    from hybridlab.finetune import freeze, param_groups
    from hybridlab.graph import parse_arch
    from hybridlab.model import HybridLM
    from hybridlab.train_config import parse_training

    with pytest.raises(ConfigError, match=r"training.freeze: must be a list"):
        parse_training({"freeze": "mamba2"})
    with pytest.raises(ConfigError, match=r"training.lr_multipliers.sal: must be a number > 0"):
        parse_training({"lr_multipliers": {"sal": 0}})
    cfg, _ = parse_training({"init_from": "x", "freeze": ["mamba2", 0], "lr_multipliers": {"sal": 5, 1: 2}})
    assert cfg.freeze == ["mamba2", 0] and cfg.init_from == "x"
    arch = parse_arch({"name": "t", "d_model": 16, "vocab_size": 32, "pattern": "MF",
                       "defaults": {"mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8}}})
    model = HybridLM(arch)
    with pytest.raises(ConfigError, match=r"training.freeze\[0\]: 'sal' is no part of this model"):
        freeze(model, arch, ["sal"])
    with pytest.raises(ConfigError, match=r"training.lr_multipliers.5: layer index 5 is past"):
        param_groups(model, arch, 0.1, 1e-3, {5: 2.0})
    assert freeze(model, arch, [1, "embed"]) > 0
    groups = param_groups(model, arch, 0.1, 1e-3, {"mamba2": 3.0})
    lrs = {g["lr"] for g in groups}
    assert lrs == {1e-3, 3e-3}  # norm_f at lr, the Mamba-2 at 3x; embed and layer 1 frozen
    assert not any(p is model.embed.weight for g in groups for p in g["params"])


def test_rope_scaling_is_checked():
    from hybridlab.graph import parse_arch

    base = {"name": "t", "d_model": 16, "vocab_size": 32, "layers": [{"block": "attention", "head_dim": 8}]}
    base["layers"][0]["rope_scaling"] = {"type": "yarn", "factor": 4}
    with pytest.raises(ConfigError, match=r"layers\[0\].rope_scaling.type: must be llama3"):
        parse_arch(base)
    base["layers"][0]["rope_scaling"] = {"type": "llama3", "factor": 8, "low_freq_factor": 4,
                                         "high_freq_factor": 1, "original_max_position_embeddings": 64}
    with pytest.raises(ConfigError, match=r"rope_scaling.high_freq_factor: must be > low_freq_factor"):
        parse_arch(base)


def test_refused_configs_name_the_key(tmp_path, mamba2_src):
    from hybridlab.pretrained.importer import import_model

    llama(tmp_path / "llama", False, None, 2)
    cases = [(mamba2_src[0], "layer_norm_epsilon", 1e-6), (mamba2_src[0], "hidden_act", "gelu"),
             (mamba2_src[0], "time_step_limit", [0.0, 1.0]), (tmp_path / "llama", "attention_bias", True),
             (tmp_path / "llama", "rms_norm_eps", 1e-6),
             (tmp_path / "llama", "rope_parameters", {"rope_type": "yarn", "factor": 4.0})]
    for i, (folder, key, value) in enumerate(cases):
        cfg = json.loads((folder / "config.json").read_text())
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({**cfg, key: value}))
        (src / "model.safetensors").symlink_to(folder / "model.safetensors")
        with pytest.raises(UserError, match=f"config.json: {key}(.rope_type)?: "):
            import_model(src, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, mamba2_src):
    from safetensors.torch import load_file, save_file

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((mamba2_src[0] / "config.json").read_text())
    weights = load_file(mamba2_src[0] / "model.safetensors")
    del weights["backbone.layers.1.mixer.A_log"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0")
    cases = [(gpt2, "model_type: 'gpt2' is not supported"),
             (broken, "weight 'backbone.layers.1.mixer.A_log' is missing"),
             (a_file, "not a folder")]
    # in parallel: two of them import torch
    procs = [subprocess.Popen([sys.executable, "-m", "hybridlab", "import", str(src), "--out", str(tmp_path / f"o{i}")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (src, _) in enumerate(cases)]
    for i, (proc, (_, expected)) in enumerate(zip(procs, cases)):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("hybridlab import: error: ") and expected in lines[0], lines[0]
        assert not (tmp_path / f"o{i}").exists()
