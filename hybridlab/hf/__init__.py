"""hybridlab models in transformers: `hybridlab export` (exporter.py) writes Mamba2ForCausalLM,
LlamaForCausalLM or, for any other graph, HybridlabForCausalLM (modeling.py).

`import hybridlab.hf` registers HybridlabConfig and HybridlabForCausalLM with transformers'
AutoConfig and AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(DIR)` loads what
export wrote. `import hybridlab` alone does not: importing transformers' model classes costs
seconds (measured ~10 s of CPU on a loaded 2-core box, ~3x `import torch`), which neither the
CLI nor a training run should pay. Importing pretrained models needs no transformers:
hybridlab.pretrained.
"""
try:
    import transformers  # noqa: F401
except ImportError:  # the `hf` extra is not installed: nothing to register with
    pass
else:
    from .modeling import HybridlabConfig, HybridlabForCausalLM, register

    register()
    __all__ = ["HybridlabConfig", "HybridlabForCausalLM"]
