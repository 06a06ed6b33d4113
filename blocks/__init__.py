"""Registered blocks. Importing this package registers all of them."""
from . import attention, mamba2, mlp, sal  # noqa: F401  (registration side effects)
from .base import Aux, Block
from hybridlab.config import Config, ConfigError
from .registry import REGISTRY, BlockSpec, block_for_code, get_block, register_block

__all__ = ["Aux", "Block", "BlockSpec", "Config", "ConfigError", "REGISTRY", "block_for_code",
           "get_block", "register_block"]
