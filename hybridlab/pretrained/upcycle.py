"""`hybridlab upcycle CHECKPOINT --insert sal --every 6 --out DIR`: new layers into a pretrained
model, starting as no-ops, so training continues from exactly the source's outputs.

The inserted block goes after every N-th layer of the type its Placement hook names (a SAL
after Mamba-2 blocks: Taipan's 6:1 layout at --every 6). A residual block adds nothing while
its last projections are zero. The SAL's two terms are the refinement of selected tokens,
h + a * o with refine: residual, and h + SwiGLU(h): with the attention's output projection and
the SwiGLU's down projection zero, both vanish whatever the gate selects. Eq. 5's interpolate
rule, (1 - a) h + a o, would overwrite h at the selected tokens, so it is refused. The result is
checked: the new model's logits must equal the source's on a probe sequence.

What trains next is set in DIR/arch.yaml: training.init_from (these weights) and
lr_multipliers: {sal: 10}; `freeze: [mamba2]` would hold the pretrained layers still.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from hybridlab.config import ConfigError, suggest
from hybridlab.errors import UserError

from .model_folder import CHECKPOINT, building, prepare_out, write_model_folder

# A block type -> (its parameters zeroed so it starts as a no-op, the settings under which that
# makes its output exactly its input).
NEUTRAL = {"sal": (("attn.wo.weight", "mlp.w_down.weight"), {"refine": "residual"})}
NEW_LAYER_LR = 10.0  # lr multiplier of the inserted layers in the written training section


def new_layers(layers: list[dict], insert: str, anchor: str, every: int, template: dict) -> tuple[list, list, list]:
    """(layer list with `template` after every `every`-th `anchor` layer, for each new position
    its old layer index or None, the new layers' indices)."""
    out, origin, k = [], [], 0
    for i, layer in enumerate(layers):
        out.append(layer)
        origin.append(i)
        if layer["block"] == anchor:
            k += 1
            if k % every == 0:
                out.append({"block": insert, **template})
                origin.append(None)
    return out, origin, [j for j, o in enumerate(origin) if o is None]


def relocated_training(loaded, out: Path, insert: str) -> dict:
    """The source's training section, readable from `out`: data paths made absolute (a
    tokenizer copied beside the model), starting from the new weights, new layers faster."""
    import shutil

    from hybridlab.data.corpus import resolve

    raw = yaml.safe_load((loaded.ckpt / "config.yaml").read_text()).get("training") or {}
    training = {k: v for k, v in raw.items() if k not in ("data_base_dir", "run_name", "freeze")}
    data = training.get("data", "default")
    if isinstance(data, dict):
        data = dict(data)
        for key in ("text", "tokens"):
            if isinstance(data.get(key), str) and data[key] != "default":
                data[key] = str(resolve(data[key], loaded.base_dir).resolve())
        if isinstance(data.get("tokenizer"), str):
            shutil.copyfile(resolve(data["tokenizer"], loaded.base_dir), out / "tokenizer.json")
            data["tokenizer"] = "tokenizer.json"
    training["data"] = data
    training["init_from"] = CHECKPOINT
    training["lr_multipliers"] = {insert: NEW_LAYER_LR}
    return training


def upcycle(source: str | Path, out: str | Path, insert: str = "sal", every: int = 6,
            settings: dict | None = None, seed: int = 0) -> tuple[Path, object, list[int]]:
    """Write DIR: the source with `insert` layers added. Returns (arch.yaml, arch, new indices)."""
    import torch

    from hybridlab.blocks import REGISTRY
    from hybridlab.graph import parse_arch
    from hybridlab.load import load_checkpoint
    from hybridlab.model import HybridLM

    if every < 1:
        raise UserError(f"--every must be >= 1, got {every}")
    if insert not in REGISTRY:
        raise UserError(f"--insert {insert!r}: unknown block{suggest(insert, REGISTRY)}")
    placement = REGISTRY[insert].module_cls.placement
    if placement is None or insert not in NEUTRAL:
        raise UserError(f"--insert {insert}: upcycling can insert {', '.join(NEUTRAL)} (a block with a "
                        "placement and a known no-op start)")
    zeroed, required = NEUTRAL[insert]
    out = prepare_out(out)
    loaded = load_checkpoint(source, device="cpu")
    arch, old = loaded.arch, loaded.model
    settings = dict(settings or {})
    try:
        cfg = REGISTRY[insert].config_cls.from_dict(settings, arch.d_model, "--set")
    except ConfigError as e:
        raise UserError(str(e)) from None
    for key, value in required.items():
        if getattr(cfg, key) != value:
            raise UserError(f"--set {key}={getattr(cfg, key)}: the new {insert} layers would change the "
                            f"model's outputs at the start; upcycling needs {key}: {value}")

    anchors = sum(layer.block == placement.after for layer in arch.layers)
    layers, origin, added = new_layers(arch.to_dict()["layers"], insert, placement.after, every, settings)
    if not added:
        raise UserError(f"{loaded.ckpt}: {anchors} {placement.after} layers, fewer than --every {every}: "
                        "nothing to insert")
    arch_dict = {**arch.to_dict(), "name": f"{arch.name}-{insert}", "layers": layers}
    new_arch = parse_arch(arch_dict)

    torch.manual_seed(seed)  # the new layers' gates, attention inputs and SwiGLU inputs
    model = HybridLM(new_arch).eval()
    with torch.no_grad():
        for part in ("embed", "norm_f", "head"):
            if getattr(old, part) is not None:
                getattr(model, part).load_state_dict(getattr(old, part).state_dict())
        for j, i in enumerate(origin):
            if i is not None:
                model.layers[j].load_state_dict(old.layers[i].state_dict())
        for j in added:
            params = dict(model.layers[j].named_parameters())
            for name in zeroed:
                params[name].zero_()
        probe = torch.randint(0, arch.vocab_size, (2, 64))
        if not torch.allclose(model(probe).logits, old(probe).logits, rtol=0, atol=1e-6):
            raise UserError(f"--insert {insert}: the upcycled model's outputs differ from the source's "
                            "at the start (the new layers are not neutral with these settings)")

    header = (f"Upcycled by `hybridlab upcycle` from {loaded.ckpt.resolve()}: a {insert} after every "
              f"{every} {placement.after} layers (layers {', '.join(map(str, added))}), started as a "
              f"no-op ({', '.join(zeroed)} zero), so the outputs equal the source's.\n"
              f"training: init_from these weights, the new layers at {NEW_LAYER_LR:g}x lr; add "
              f"`freeze: [{placement.after}]` to hold the pretrained layers still.")
    with building(out):
        training = relocated_training(loaded, out, insert)
        path = write_model_folder(out, arch_dict, training, model, header)
    return path, new_arch, added
