"""The block registry: name -> (config class, module class, one-letter pattern code)."""
from __future__ import annotations

from dataclasses import dataclass

from hybridlab.config import ConfigError, suggest


@dataclass(frozen=True)
class BlockSpec:
    name: str
    code: str  # one letter, used in pattern strings
    config_cls: type
    module_cls: type
    summary: str


REGISTRY: dict[str, BlockSpec] = {}


def register_block(name: str, code: str, config_cls: type, summary: str):
    """Class decorator: `@register_block("sal", "S", SALConfig, "Selective Attention Layer")`."""

    def wrap(module_cls):
        if name in REGISTRY:
            raise ValueError(f"block {name!r} registered twice")
        if len(code) != 1 or not code.isalpha() or any(s.code == code for s in REGISTRY.values()):
            raise ValueError(f"block {name!r}: pattern code {code!r} must be one unused letter")
        config_cls.block_name = name
        module_cls.config_cls = config_cls
        REGISTRY[name] = BlockSpec(name, code, config_cls, module_cls, summary)
        return module_cls

    return wrap


def get_block(name: str, path: str = "") -> BlockSpec:
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(path, f"unknown block {name!r}{suggest(str(name), REGISTRY)}; "
                                f"registered blocks: {known}")
    return REGISTRY[name]


def block_for_code(code: str, path: str = "") -> BlockSpec:
    for spec in REGISTRY.values():
        if spec.code == code:
            return spec
    codes = ", ".join(f"{s.code}={s.name}" for s in REGISTRY.values())
    raise ConfigError(path, f"unknown pattern letter {code!r}; letters: {codes}")
