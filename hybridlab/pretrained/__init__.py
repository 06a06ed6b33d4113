"""Starting from pretrained models, with no transformers needed: `hybridlab import` (importer.py)
reads a local transformers Mamba2 / Llama or mamba_ssm folder into a hybridlab model folder,
`hybridlab upcycle` (upcycle.py) adds SALs to one that start as no-ops.

    source.py        a model folder on disk: config.json and weights, read lazily
    formats.py       how configs and weight names correspond, both directions (export uses it too)
    model_folder.py  what import and upcycle write: arch.yaml + checkpoints/step_0000000/

Exporting to transformers and its Auto classes are in hybridlab.hf.
"""
