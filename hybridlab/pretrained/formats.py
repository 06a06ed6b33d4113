"""How hybridlab's blocks and weights correspond to transformers' Mamba2ForCausalLM and
LlamaForCausalLM, and to mamba_ssm's MambaLMHeadModel, in both directions.

hybridlab blocks are whole residual units, so a Mamba-2 layer is a `mamba2` block and a Llama
decoder layer is an `attention` block followed by an `mlp` block. Weights correspond through
`Pair`s: one hybridlab tensor is one source tensor, or several concatenated along dim 0
(Llama's q/k/v into `wqkv`, gate/up into `w_gate_up`), split back by their row counts on export.

What a source config says that hybridlab cannot compute the same way is refused with an error
naming the key: different norm epsilons (hybridlab's blocks use 1e-5), biases, activations other
than SiLU, RoPE scalings other than Llama 3's, Mamba-2 options with no hybridlab counterpart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hybridlab.errors import UserError

EPS = 1e-5  # RMSNorm epsilon of hybridlab's pre-norms and of Mamba-2's gated norm


@dataclass(frozen=True)
class Pair:
    """A hybridlab weight and the source weights it is made of: (name, rows) in dim-0 order."""

    ours: str
    theirs: tuple[tuple[str, int], ...]


def refuse(where: str, key: str, problem: str):
    raise UserError(f"{where}: {key}: {problem}")


def _number(value):
    """A number from config.json; transformers 5 writes infinities as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _same(a, b) -> bool:
    a, b = _number(a), _number(b)
    return isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9)


# --------------------------------------------------------------------------- Mamba-2

def mamba2_pairs(n_layers: int, embed: str, bias: bool, conv_bias: bool, tied: bool) -> list[Pair]:
    """Mamba2ForCausalLM and MambaLMHeadModel name a layer the same way under
    backbone.layers.N; only the embedding differs (`embeddings` / `embedding`)."""
    pairs = [Pair("embed.weight", ((embed, 0),))]
    for i in range(n_layers):
        src, ours = f"backbone.layers.{i}.", f"layers.{i}."
        names = {"norm.weight": "norm.weight", "in_proj.weight": "mixer.in_proj.weight",
                 "conv1d.weight": "mixer.conv1d.weight", "dt_bias": "mixer.dt_bias",
                 "A_log": "mixer.A_log", "D": "mixer.D", "norm_gated": "mixer.norm.weight",
                 "out_proj.weight": "mixer.out_proj.weight"}
        if bias:
            names.update({"in_proj.bias": "mixer.in_proj.bias", "out_proj.bias": "mixer.out_proj.bias"})
        if conv_bias:
            names["conv1d.bias"] = "mixer.conv1d.bias"
        pairs += [Pair(ours + a, ((src + b, 0),)) for a, b in names.items()]
    pairs.append(Pair("norm_f.weight", (("backbone.norm_f.weight", 0),)))
    if not tied:
        pairs.append(Pair("head.weight", (("lm_head.weight", 0),)))
    return pairs


def _mamba2_arch(name: str, d_model: int, vocab: int, n_layers: int, tied: bool, block: dict) -> dict:
    return {"name": name, "d_model": d_model, "vocab_size": vocab, "tie_embeddings": tied,
            "norm_eps": EPS, "defaults": {"mamba2": block},
            "layers": [{"block": "mamba2", "repeat": n_layers}]}


def from_transformers_mamba2(cfg: dict, where: str, name: str) -> tuple[dict, list[Pair]]:
    """transformers' Mamba2Config (config.json, model_type mamba2) -> (arch mapping, pairs)."""
    get = cfg.get
    if get("hidden_act", "silu") not in ("silu", "swish"):
        refuse(where, "hidden_act", f"{get('hidden_act')!r}: hybridlab's Mamba-2 conv uses SiLU")
    if not _same(get("layer_norm_epsilon", 1e-5), EPS):
        refuse(where, "layer_norm_epsilon", f"{get('layer_norm_epsilon')}: hybridlab's norms use {EPS}")
    limit = [_number(v) for v in get("time_step_limit", (0.0, math.inf))]
    if limit != [0.0, math.inf]:
        refuse(where, "time_step_limit", f"{limit}: hybridlab does not clamp dt (only [0.0, inf])")
    d, expand = int(get("hidden_size", 4096)), get("expand", 2)
    headdim, nheads = int(get("head_dim", 64)), int(get("num_heads", 128))
    if int(expand) != expand:
        refuse(where, "expand", f"{expand}: hybridlab needs an integer expansion")
    if int(expand) * d != nheads * headdim:
        refuse(where, "num_heads", f"{nheads} heads of {headdim} != expand * hidden_size = {int(expand) * d}")
    block = {"d_state": int(get("state_size", 128)), "headdim": headdim, "expand": int(expand),
             "d_conv": int(get("conv_kernel", 4)), "ngroups": int(get("n_groups", 8)),
             "chunk_size": int(get("chunk_size", 256)), "bias": bool(get("use_bias", False)),
             "conv_bias": bool(get("use_conv_bias", True)), "norm_before_gate": False,
             "dt_min": float(get("time_step_min", 0.001)), "dt_max": float(get("time_step_max", 0.1))}
    tied = bool(get("tie_word_embeddings", False))
    n = int(get("num_hidden_layers", 64))
    arch = _mamba2_arch(name, d, int(get("vocab_size", 32768)), n, tied, block)
    return arch, mamba2_pairs(n, "backbone.embeddings.weight", block["bias"], block["conv_bias"], tied)


# mamba_ssm's Mamba2 arguments: those hybridlab's mamba2 block has under the same name (with
# mamba_ssm's defaults), those that only change the init or the kernels (ignored), and those
# whose other values it cannot compute.
SSM_CFG = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
           "bias": False, "conv_bias": True, "norm_before_gate": False, "dt_min": 0.001, "dt_max": 0.1}
SSM_CFG_IGNORED = ("layer", "A_init_range", "dt_init_floor", "use_mem_eff_path", "conv_init",
                   "process_group", "sequence_parallel")
SSM_CFG_FIXED = {"rmsnorm": True, "D_has_hdim": False, "d_ssm": None, "dt_limit": [0.0, math.inf]}


def from_mamba_ssm(cfg: dict, where: str, name: str, vocab: int) -> tuple[dict, list[Pair]]:
    """mamba_ssm's MambaLMHeadModel config (d_model, n_layer, ssm_cfg: {layer: Mamba2}) ->
    (arch mapping, pairs). `vocab`: the embedding's rows (the vocabulary padded to
    pad_vocab_size_multiple)."""
    get = cfg.get
    ssm = get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        refuse(where, "ssm_cfg", "must be a mapping")
    if ssm.get("layer", "Mamba1") != "Mamba2":
        refuse(where, "ssm_cfg.layer", f"{ssm.get('layer', 'Mamba1')!r}: hybridlab imports Mamba2 layers only")
    if get("d_intermediate", 0):
        refuse(where, "d_intermediate", f"{get('d_intermediate')}: MLPs between the Mamba-2 layers are not imported")
    if get("attn_layer_idx"):
        refuse(where, "attn_layer_idx", "mamba_ssm's attention layers are not imported (Mamba-2 only)")
    if not get("rms_norm", True):
        refuse(where, "rms_norm", "false (LayerNorm): hybridlab's blocks use RMSNorm")
    if not _same(get("norm_epsilon", 1e-5), EPS):
        refuse(where, "norm_epsilon", f"{get('norm_epsilon')}: hybridlab's norms use {EPS}")
    block = dict(SSM_CFG)
    for key, value in ssm.items():
        if key in SSM_CFG:
            block[key] = value
        elif key in SSM_CFG_FIXED:
            fixed = SSM_CFG_FIXED[key]
            if ([_number(v) for v in value] if isinstance(value, (list, tuple)) else value) != fixed:
                refuse(where, f"ssm_cfg.{key}", f"{value!r}: hybridlab supports only {fixed!r}")
        elif key not in SSM_CFG_IGNORED:
            refuse(where, f"ssm_cfg.{key}", "unknown Mamba2 argument")
    if "A_init_range" in ssm:
        block["A_init_min"], block["A_init_max"] = (float(v) for v in ssm["A_init_range"])
    tied = bool(get("tie_embeddings", True))
    n = int(get("n_layer", 64))
    arch = _mamba2_arch(name, int(get("d_model", 2560)), vocab, n, tied, block)
    return arch, mamba2_pairs(n, "backbone.embedding.weight", bool(block["bias"]), bool(block["conv_bias"]), tied)


def to_transformers_mamba2(arch) -> tuple[dict, list[Pair]] | str:
    """A pure Mamba-2 arch -> (Mamba2Config kwargs, pairs), or why transformers cannot hold it."""
    if any(layer.block != "mamba2" for layer in arch.layers):
        return "not every layer is mamba2"
    if any(layer.share for layer in arch.layers):
        return "it shares weights between layers"
    cfg = arch.layers[0].config
    if any(layer.config != cfg for layer in arch.layers):
        return "its Mamba-2 layers differ in their settings (transformers has one config for all)"
    if cfg.norm_before_gate:
        return "norm_before_gate: true (transformers' Mamba2 gates before the norm)"
    if not _same(arch.norm_eps, EPS):
        return f"norm_eps {arch.norm_eps} (transformers' Mamba2 has one epsilon, and the blocks use {EPS})"
    d = arch.d_model
    kwargs = dict(vocab_size=arch.vocab_size, hidden_size=d, num_hidden_layers=len(arch.layers),
                  state_size=cfg.d_state, head_dim=cfg.headdim, num_heads=cfg.nheads(d),
                  expand=cfg.expand, conv_kernel=cfg.d_conv, n_groups=cfg.ngroups,
                  chunk_size=cfg.chunk_size, use_bias=cfg.bias, use_conv_bias=cfg.conv_bias,
                  layer_norm_epsilon=EPS, hidden_act="silu", time_step_min=cfg.dt_min,
                  time_step_max=cfg.dt_max, tie_word_embeddings=arch.tie_embeddings,
                  residual_in_fp32=True)
    pairs = mamba2_pairs(len(arch.layers), "backbone.embeddings.weight", cfg.bias, cfg.conv_bias,
                         arch.tie_embeddings)
    return kwargs, pairs


# --------------------------------------------------------------------------- Llama

def llama_pairs(n_layers: int, q_rows: int, kv_rows: int, hidden: int, tied: bool) -> list[Pair]:
    """Decoder layer i -> hybridlab layers 2i (attention) and 2i + 1 (mlp)."""
    pairs = [Pair("embed.weight", (("model.embed_tokens.weight", 0),))]
    for i in range(n_layers):
        src, a, m = f"model.layers.{i}.", f"layers.{2 * i}.", f"layers.{2 * i + 1}."
        attn = src + "self_attn."
        pairs += [
            Pair(a + "norm.weight", ((src + "input_layernorm.weight", 0),)),
            Pair(a + "attn.wqkv.weight", ((attn + "q_proj.weight", q_rows), (attn + "k_proj.weight", kv_rows),
                                          (attn + "v_proj.weight", kv_rows))),
            Pair(a + "attn.wo.weight", ((attn + "o_proj.weight", 0),)),
            Pair(m + "norm.weight", ((src + "post_attention_layernorm.weight", 0),)),
            Pair(m + "mlp.w_gate_up.weight", ((src + "mlp.gate_proj.weight", hidden),
                                              (src + "mlp.up_proj.weight", hidden))),
            Pair(m + "mlp.w_down.weight", ((src + "mlp.down_proj.weight", 0),)),
        ]
    pairs.append(Pair("norm_f.weight", (("model.norm.weight", 0),)))
    if not tied:
        pairs.append(Pair("head.weight", (("lm_head.weight", 0),)))
    return pairs


def llama_rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, hybridlab rope_scaling or None) from either transformers layout: v4's
    rope_theta + rope_scaling, or v5's rope_parameters holding both."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        refuse(where, key, f"must be a mapping, got {params!r}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not _same(factor, 1.0):
        refuse(where, "partial_rotary_factor", f"{factor}: hybridlab rotates whole heads")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        refuse(where, f"{key}.rope_type", f"{kind!r}: hybridlab supports default and llama3 RoPE")
    scaling = {"type": "llama3"}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if k not in params:
            refuse(where, f"{key}.{k}", "missing (llama3 scaling needs it)")
        scaling[k] = params[k]
    return theta, scaling


def from_transformers_llama(cfg: dict, where: str, name: str) -> tuple[dict, list[Pair]]:
    """transformers' LlamaConfig (model_type llama) -> (arch mapping, pairs)."""
    get = cfg.get
    for key, ok in (("attention_bias", False), ("mlp_bias", False)):
        if get(key, False) != ok:
            refuse(where, key, f"{get(key)!r}: hybridlab's attention and MLP have no biases")
    if get("hidden_act", "silu") not in ("silu", "swish"):
        refuse(where, "hidden_act", f"{get('hidden_act')!r}: hybridlab's MLP is SwiGLU (SiLU)")
    if not _same(get("rms_norm_eps", 1e-6), EPS):
        refuse(where, "rms_norm_eps", f"{get('rms_norm_eps', 1e-6)}: hybridlab's norms use {EPS}")
    d, heads = int(get("hidden_size", 4096)), int(get("num_attention_heads", 32))
    head_dim = int(get("head_dim") or d // heads)
    if head_dim * heads != d:
        refuse(where, "head_dim", f"{heads} heads of {head_dim} != hidden_size {d}: hybridlab's heads tile d_model")
    kv = int(get("num_key_value_heads") or heads)
    theta, scaling = llama_rope(cfg, where)
    attention = {"head_dim": head_dim, "positional": "rope", "rope_theta": theta}
    if kv != heads:
        attention["n_kv_heads"] = kv
    if scaling:
        attention["rope_scaling"] = scaling
    hidden, n = int(get("intermediate_size", 11008)), int(get("num_hidden_layers", 32))
    tied = bool(get("tie_word_embeddings", False))
    arch = {"name": name, "d_model": d, "vocab_size": int(get("vocab_size", 32000)),
            "tie_embeddings": tied, "norm_eps": EPS,
            "defaults": {"attention": attention, "mlp": {"hidden": hidden}},
            "layers": [{"repeat": n, "body": [{"block": "attention"}, {"block": "mlp"}]}]}
    return arch, llama_pairs(n, heads * head_dim, kv * head_dim, hidden, tied)


def to_transformers_llama(arch) -> tuple[dict, list[Pair]] | str:
    """Attention + MLP pairs with RoPE -> (LlamaConfig kwargs, pairs), or why not."""
    layers = arch.layers
    if len(layers) % 2 or any(l.block != ("attention" if i % 2 == 0 else "mlp") for i, l in enumerate(layers)):
        return "its layers are not attention, mlp pairs"
    if any(layer.share for layer in layers):
        return "it shares weights between layers"
    attn, mlp = layers[0].config, layers[1].config
    if any(l.config != (attn if i % 2 == 0 else mlp) for i, l in enumerate(layers)):
        return "its layers differ in their settings (transformers has one config for all)"
    if attn.positional != "rope":
        return "its attention has no RoPE (positional: none)"
    if not _same(arch.norm_eps, EPS):
        return f"norm_eps {arch.norm_eps} (Llama has one epsilon, and the blocks use {EPS})"
    d = arch.d_model
    heads = d // attn.head_dim
    kv = attn.n_kv_heads or heads
    hidden = mlp.width(d)
    kwargs = dict(vocab_size=arch.vocab_size, hidden_size=d, intermediate_size=hidden,
                  num_hidden_layers=len(layers) // 2, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=attn.head_dim, hidden_act="silu",
                  rms_norm_eps=EPS, tie_word_embeddings=arch.tie_embeddings,
                  attention_bias=False, mlp_bias=False, rope_theta=attn.rope_theta,
                  max_position_embeddings=4096)
    if attn.rope_scaling:
        s = attn.rope_scaling
        kwargs["rope_scaling"] = {"rope_type": "llama3", **{k: v for k, v in s.items() if k != "type"}}
        kwargs["max_position_embeddings"] = int(s["original_max_position_embeddings"] * s["factor"])
    return kwargs, llama_pairs(len(layers) // 2, heads * attn.head_dim, kv * attn.head_dim, hidden,
                               arch.tie_embeddings)
