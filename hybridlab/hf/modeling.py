"""Any hybridlab graph as a transformers model: `HybridlabConfig` holds the graph (the same
mapping as an architecture YAML), `HybridlabForCausalLM` wraps `HybridLM`, so
`AutoModelForCausalLM.from_pretrained(DIR)` loads what `hybridlab export` wrote once
`hybridlab.hf` is imported (it registers both classes).

Generation recomputes the whole sequence at every token (no cache crosses `generate`'s
interface): correct for every block, slow for long outputs. `hybridlab generate` decodes with
the blocks' own caches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class HybridlabConfig(PretrainedConfig):
    model_type = "hybridlab"

    def __init__(self, arch: dict | None = None, **kwargs):
        self.arch = arch or {}
        # HybridLM ties its head to the embedding itself; transformers sees no separate head
        kwargs["tie_word_embeddings"] = False
        kwargs.setdefault("use_cache", False)
        super().__init__(**kwargs)
        # read by tools that size things from the config (lm-eval, generation utilities)
        self.vocab_size = self.arch.get("vocab_size")
        self.hidden_size = self.arch.get("d_model")
        self.num_hidden_layers = len(self.arch.get("layers", ()))


class HybridlabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: HybridlabConfig):
        super().__init__(config)
        from hybridlab.graph import parse_arch
        from hybridlab.model import HybridLM

        self.model = HybridLM(parse_arch(config.arch))
        self.post_init()

    @classmethod
    def from_model(cls, model) -> "HybridlabForCausalLM":
        """Wrap a trained HybridLM (its weights copied)."""
        hf = cls(HybridlabConfig(arch=model.arch.to_dict()))
        hf.model.load_state_dict(model.state_dict())
        return hf

    def _init_weights(self, module):
        """HybridLM initialises its blocks itself, and from_pretrained loads every weight."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand the forward a KV cache: there is none

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, L) -> logits (B, L, V); with labels (B, L), the next-token loss
        (labels shifted here, as transformers' causal LMs do; -100 ignored)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HybridlabForCausalLM takes no padding: give sequences of one length "
                             "(every attention_mask entry 1)")
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM resolve model_type "hybridlab"."""
    AutoConfig.register(HybridlabConfig.model_type, HybridlabConfig, exist_ok=True)
    AutoModelForCausalLM.register(HybridlabConfig, HybridlabForCausalLM, exist_ok=True)
