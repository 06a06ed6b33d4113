"""Test set-up. Triton's CPU interpreter must be switched on before any @triton.jit runs."""
import os

import torch

from hybridlab._checkout import keep_checkout_last

keep_checkout_last()  # the checkout's kernels/ must not shadow Hugging Face's `kernels` (transformers)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
