"""`hybridlab import SOURCE --out DIR`: a local pretrained model -> a hybridlab model folder.

SOURCE is a folder holding transformers' Mamba2ForCausalLM or LlamaForCausalLM (config.json
with model_type mamba2 / llama), or mamba_ssm's MambaLMHeadModel (config.json with d_model,
n_layer, ssm_cfg: {layer: Mamba2}). The graph and the weight names come from formats.py; the
result is DIR/arch.yaml plus a step-0 checkpoint (model_folder.py). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

from hybridlab.config import ConfigError
from hybridlab.errors import UserError

from .formats import Pair, from_mamba_ssm, from_transformers_llama, from_transformers_mamba2
from .model_folder import CHECKPOINT, building, prepare_out, tokenizer_data, write_model_folder
from .source import Weights, model_folder, read_config

FORMATS = {"mamba2": "transformers Mamba2ForCausalLM", "llama": "transformers LlamaForCausalLM",
           "mamba_ssm": "mamba_ssm MambaLMHeadModel"}
# weights a source may carry that the model computes instead (old Llama checkpoints' RoPE table)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def detect(cfg: dict, where: str) -> str:
    """Which format a config.json describes: mamba2, llama or mamba_ssm."""
    model_type = cfg.get("model_type")
    if model_type in ("mamba2", "llama"):
        return model_type
    if model_type is None and {"d_model", "n_layer", "ssm_cfg"} <= set(cfg):
        return "mamba_ssm"
    raise UserError(f"{where}: model_type: {model_type!r} is not supported; hybridlab imports "
                    "mamba2 and llama (transformers) and mamba_ssm's MambaLMHeadModel")


def training_defaults(data) -> dict:
    """A short fine-tuning run from the imported weights; edit before a real run."""
    return {"data": data, "init_from": CHECKPOINT, "seq_len": 512, "batch_size": 8, "steps": 200,
            "lr": 1.0e-4, "min_lr": 1.0e-5, "warmup_steps": 20, "eval_every": 100,
            "checkpoint_every": 100}


def gather(weights: Weights, pairs: list[Pair], ignored: set[str]) -> dict:
    """hybridlab's state dict from the source tensors; every source tensor must be used."""
    import torch

    state = {}
    for pair in pairs:
        parts = [weights.take(name) for name, _ in pair.theirs]
        state[pair.ours] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).contiguous()
    unused = [n for n in weights.unused() if n not in ignored and not n.endswith(IGNORED_SUFFIXES)]
    if unused:
        raise UserError(f"{weights.folder}: weights this import would not use: {', '.join(unused[:3])}"
                        + (f" (and {len(unused) - 3} more)" if len(unused) > 3 else "")
                        + "; the model has parts hybridlab does not map")
    return state


def build_model(arch, state: dict, pairs: list[Pair], folder: Path):
    """HybridLM(arch) holding `state` (no random init: built on the meta device, then the
    tensors assigned). A shape that does not fit names the source weight."""
    import torch

    from hybridlab.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(arch)
    expected = model.state_dict()
    theirs = {p.ours: ", ".join(n for n, _ in p.theirs) for p in pairs}
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{folder}: weight {theirs[key]} has shape {tuple(tensor.shape)}, but "
                            f"config.json implies {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def import_model(source: str | Path, out: str | Path, name: str | None = None) -> tuple[Path, object, str]:
    """Convert SOURCE into the model folder OUT. Returns (arch.yaml path, arch, format)."""
    folder = model_folder(source)
    cfg = read_config(folder)
    where = str(folder / "config.json")
    kind = detect(cfg, where)
    out = prepare_out(out)
    weights = Weights(folder)
    name = name or folder.resolve().name
    try:
        if kind == "mamba2":
            arch_dict, pairs = from_transformers_mamba2(cfg, where, name)
        elif kind == "llama":
            arch_dict, pairs = from_transformers_llama(cfg, where, name)
        else:
            vocab = weights.shape("backbone.embedding.weight")[0]  # padded to pad_vocab_size_multiple
            arch_dict, pairs = from_mamba_ssm(cfg, where, name, vocab)
    except (TypeError, ValueError) as e:  # a value of the wrong type: "hidden_size": "big"
        raise UserError(f"{where}: malformed ({type(e).__name__}: {e})") from None
    # every weight there before any is read; torch is imported only past this point
    weights.require(src for pair in pairs for src, _ in pair.theirs)
    from hybridlab.graph import parse_arch

    try:
        arch = parse_arch(arch_dict)
    except ConfigError as e:
        raise UserError(f"{where}: not expressible as a hybridlab graph: {e}") from None
    tied = arch.tie_embeddings
    state = gather(weights, pairs, {"lm_head.weight"} if tied else set())
    model = build_model(arch, state, pairs, folder)
    header = (f"Imported by `hybridlab import` from {folder.resolve()} ({FORMATS[kind]}).\n"
              f"training.init_from starts from its weights; hybridlab train {Path(out) / 'arch.yaml'}")
    with building(out):
        data = tokenizer_data(folder / "tokenizer.json", out)
        path = write_model_folder(out, arch_dict, training_defaults(data), model, header)
    return path, arch, FORMATS[kind]
