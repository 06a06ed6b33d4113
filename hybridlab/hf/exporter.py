"""`hybridlab export RUN_OR_CHECKPOINT --out DIR`: a hybridlab checkpoint as a transformers folder.

A pure Mamba-2 graph becomes Mamba2ForCausalLM and a Llama-shaped one (attention, mlp pairs
with RoPE) LlamaForCausalLM, when transformers' single config can hold it (hybridlab.pretrained.formats says
why not otherwise); every other graph becomes HybridlabForCausalLM (modeling.py), which loads with
`AutoModelForCausalLM.from_pretrained(DIR)` after `import hybridlab.hf`. A tokenizer.json the
run trained with is copied beside the weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hybridlab.errors import UserError

from hybridlab.pretrained.formats import Pair, to_transformers_llama, to_transformers_mamba2
from hybridlab.pretrained.model_folder import building, prepare_out

FORMATS = ("auto", "mamba2", "llama", "hybridlab")


def choose(arch, fmt: str = "auto") -> tuple[str, object, str]:
    """(format, its (config kwargs, pairs) or None, why the graph is not the other formats)."""
    mamba2, llama = to_transformers_mamba2(arch), to_transformers_llama(arch)
    if fmt == "mamba2" and isinstance(mamba2, str):
        raise UserError(f"--format mamba2: this graph is not a transformers Mamba-2: {mamba2}")
    if fmt == "llama" and isinstance(llama, str):
        raise UserError(f"--format llama: this graph is not a transformers Llama: {llama}")
    if fmt in ("auto", "mamba2") and not isinstance(mamba2, str):
        return "mamba2", mamba2, ""
    if fmt in ("auto", "llama") and not isinstance(llama, str):
        return "llama", llama, ""
    return "hybridlab", None, f"not Mamba2ForCausalLM ({mamba2}); not LlamaForCausalLM ({llama})"


def transformers_state(model, pairs: list[Pair]) -> dict:
    """Source-named tensors from the HybridLM, fused ones split back by their rows."""
    ours = model.state_dict()
    state = {}
    for pair in pairs:
        tensor = ours[pair.ours]
        if len(pair.theirs) == 1:
            state[pair.theirs[0][0]] = tensor.contiguous()
            continue
        for (name, _), part in zip(pair.theirs, tensor.split([rows for _, rows in pair.theirs], dim=0)):
            state[name] = part.contiguous()
    return state


def copy_tokenizer(loaded, out: Path) -> bool:
    """The tokenizer.json of the checkpoint's training data, if any, as a fast tokenizer."""
    from hybridlab.data.corpus import resolve

    spec = loaded.data_spec
    if not isinstance(spec, dict) or not spec.get("tokenizer"):
        return False
    path = resolve(spec["tokenizer"], loaded.base_dir)
    if not path.is_file():
        return False
    shutil.copyfile(path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    return True


def export_model(path: str | Path, out: str | Path, fmt: str = "auto") -> tuple[Path, str, str]:
    """Write the checkpoint at `path` to the new folder `out`. Returns (out, format, note)."""
    try:
        import transformers
    except ImportError:
        raise UserError("export needs transformers: pip install 'hybridlab[hf]'") from None
    from safetensors.torch import save_file

    from hybridlab.load import load_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    out = prepare_out(out)
    loaded = load_checkpoint(path, device="cpu")
    kind, converted, note = choose(loaded.arch, fmt)
    with building(out):
        if kind == "hybridlab":
            from .modeling import HybridlabForCausalLM

            HybridlabForCausalLM.from_model(loaded.model).save_pretrained(out)
        else:
            kwargs, pairs = converted
            config_cls = transformers.Mamba2Config if kind == "mamba2" else transformers.LlamaConfig
            config = config_cls(**kwargs)
            config.architectures = ["Mamba2ForCausalLM" if kind == "mamba2" else "LlamaForCausalLM"]
            config.save_pretrained(out)
            save_file(transformers_state(loaded.model, pairs), str(out / "model.safetensors"),
                      metadata={"format": "pt"})
        copy_tokenizer(loaded, out)
    return out, kind, note
