"""YAML graph -> validated, normalised architecture.

The canonical form is an explicit per-layer list. Shorthands that normalise into it:

    layers:
      - repeat: 3                      # a repeated group
        body:
          - {block: mamba2, repeat: 6}   # a repeated layer
          - {block: sal, capacity: 0.2}  # per-layer overrides of the block's config
      - {pattern: "(M*6 S)*2"}         # pattern letters: registered one-letter codes
      - {block: mlp, name: shared}     # a named layer ...
      - {block: mlp, share: shared}    # ... whose weights a later layer reuses
    pattern: "(MMMMMMS)*4"             # or the whole stack as one pattern

`defaults` gives per-block-type settings; every error names its YAML path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hybridlab.blocks import REGISTRY, block_for_code, get_block
from hybridlab.config import Config, ConfigError, field, join_path, suggest

TOP_LEVEL = ("name", "description", "d_model", "vocab_size", "tie_embeddings", "norm_eps",
             "init_std", "defaults", "layers", "pattern", "training")  # training: see train_config.py
LAYER_KEYS = ("block", "repeat", "name", "share")


@dataclass(frozen=True)
class ModelConfig(Config):
    name: str = field("unnamed", "architecture name")
    description: str = field("", "free text")
    d_model: int = field(768, "residual stream width", ge=8)
    vocab_size: int = field(128256, "vocabulary size", ge=2)
    tie_embeddings: bool = field(True, "output head shares the embedding matrix")
    norm_eps: float = field(1e-5, "RMSNorm epsilon of the final norm", gt=0)
    init_std: float = field(0.02, "std of the embedding (and untied head) init", gt=0)

    block_name = "the model"


@dataclass(frozen=True)
class LayerSpec:
    block: str
    config: Any  # the block's frozen config
    path: str  # where in the YAML it came from
    name: str | None = None
    share: str | None = None

    @property
    def code(self) -> str:
        return REGISTRY[self.block].code

    def to_dict(self) -> dict:
        if self.share:
            return {"block": self.block, "share": self.share}
        out = {"block": self.block}
        if self.name:
            out["name"] = self.name
        out.update(self.config.to_dict())
        return out


@dataclass(frozen=True)
class Arch:
    model: ModelConfig
    layers: tuple[LayerSpec, ...]

    def __getattr__(self, item):  # arch.d_model, arch.vocab_size, ...
        if item in ("model", "layers"):
            raise AttributeError(item)
        return getattr(self.model, item)

    def to_dict(self) -> dict:
        out = self.model.to_dict()
        if not out["description"]:
            del out["description"]
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return out

    def to_yaml(self) -> str:
        # default_flow_style=None: each layer (a mapping of scalars) on one line
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=1000)

    def pattern(self) -> str:
        return "".join(layer.code for layer in self.layers)

    def arch_hash(self) -> str:
        """Stable across the shorthand used: hashes the canonical form, minus name/description."""
        d = self.to_dict()
        d.pop("name", None)
        d.pop("description", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- patterns

# Bounds on what a YAML may expand to, checked before anything is multiplied or allocated, so a
# hostile or mistyped file (an alias bomb, "M*999999999", d_model 10^9) fails in milliseconds with
# a clear message instead of hanging or running out of memory. Raise them through the environment.
MAX_LAYERS = int(os.environ.get("HYBRIDLAB_MAX_LAYERS", 4096))
MAX_DEPTH = 32  # nesting of `body:` groups and pattern parentheses
MAX_PARAMS = float(os.environ.get("HYBRIDLAB_MAX_PARAMS", 1e12))


def _too_many(n: int, path: str) -> None:
    if n > MAX_LAYERS:
        raise ConfigError(path, f"expands to more than {MAX_LAYERS} layers "
                                f"(the limit; raise it with HYBRIDLAB_MAX_LAYERS)")


_TOKEN = re.compile(r"\s*(?:(?P<letter>[A-Za-z])|(?P<open>\()|(?P<close>\))|\*\s*(?P<times>\d+)|(?P<bad>\S))")


def parse_pattern(text: str, path: str) -> list[str]:
    """'(M*6 S)*2' -> ['M']*6 + ['S'] + ['M']*6 + ['S'].  `*N` repeats the letter or group before it."""
    tokens = [m for m in _TOKEN.finditer(text) if m.lastgroup]
    pos = 0

    def fail(msg):
        raise ConfigError(path, f"bad pattern {text!r}: {msg}")

    def seq(depth):
        nonlocal pos
        out: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            kind = tok.lastgroup
            if kind == "letter":
                block_for_code(tok.group("letter"), path)
                items = [tok.group("letter")]
                pos += 1
            elif kind == "open":
                if depth >= MAX_DEPTH:
                    fail(f"groups nested deeper than {MAX_DEPTH}")
                pos += 1
                items = seq(depth + 1)
                if pos >= len(tokens) or tokens[pos].lastgroup != "close":
                    fail("unclosed '('")
                pos += 1
                if not items:
                    fail("empty group '()'")
            elif kind == "close":
                if depth == 0:
                    fail(f"unmatched ')' at column {tok.start('close') + 1}")
                return out
            elif kind == "times":
                fail(f"'*{tok.group('times')}' at column {tok.start() + 1} follows nothing")
            else:
                fail(f"unexpected {tok.group('bad')!r} at column {tok.start('bad') + 1}")
            if pos < len(tokens) and tokens[pos].lastgroup == "times":
                n = int(tokens[pos].group("times"))
                if n < 1:
                    fail("a repeat count must be >= 1")
                _too_many(len(out) + len(items) * n, path)
                items = items * n
                pos += 1
            out.extend(items)
            _too_many(len(out), path)
        return out

    letters = seq(0)
    if not letters:
        fail("no layers")
    return letters


# --------------------------------------------------------------------------- parsing

@dataclass
class _Raw:
    block: str
    overrides: dict
    path: str
    name: str | None = None
    share: str | None = None


def _check_repeat(value, path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(path, f"must be an integer >= 1, got {value!r}")
    return value


def _expand(items, path: str, depth: int = 0) -> list[_Raw]:
    if depth > MAX_DEPTH:
        raise ConfigError(path, f"repeat groups nested deeper than {MAX_DEPTH}")
    if not isinstance(items, list):
        raise ConfigError(path, f"must be a list of layers, got {type(items).__name__}")
    if not items:
        raise ConfigError(path, "must list at least one layer")
    out: list[_Raw] = []
    for i, item in enumerate(items):
        p = join_path(path, i)
        if isinstance(item, str):
            item = {"pattern": item}
        if not isinstance(item, dict):
            raise ConfigError(p, f"must be a mapping like {{block: mamba2}}, got {item!r}")
        if "body" in item:
            extra = set(item) - {"repeat", "body"}
            if extra:
                raise ConfigError(join_path(p, sorted(extra)[0]), "a repeat group takes only 'repeat' and 'body'")
            n = _check_repeat(item.get("repeat", 1), join_path(p, "repeat"))
            body = _expand(item["body"], join_path(p, "body"), depth + 1)
            _too_many(len(out) + n * len(body), join_path(p, "repeat"))
            named = [r.name for r in body if r.name]
            if n > 1 and named:
                raise ConfigError(join_path(p, "body"), f"layer name {named[0]!r} would repeat {n} times; "
                                                        "name one layer outside the repeat and use 'share'")
            out.extend(_Raw(r.block, r.overrides, r.path, r.name, r.share) for _ in range(n) for r in body)
        elif "pattern" in item:
            extra = set(item) - {"pattern", "repeat"}
            if extra:
                raise ConfigError(join_path(p, sorted(extra)[0]), "a pattern item takes only 'pattern' and 'repeat'")
            if not isinstance(item["pattern"], str):
                raise ConfigError(join_path(p, "pattern"), "must be a string of block letters")
            n = _check_repeat(item.get("repeat", 1), join_path(p, "repeat"))
            letters = parse_pattern(item["pattern"], join_path(p, "pattern"))
            _too_many(len(out) + n * len(letters), join_path(p, "repeat"))
            out.extend(_Raw(block_for_code(c).name, {}, join_path(p, "pattern")) for _ in range(n) for c in letters)
        elif "block" in item:
            name = item["block"]
            if not isinstance(name, str):
                raise ConfigError(join_path(p, "block"), f"must be a block name, got {name!r}")
            get_block(name, join_path(p, "block"))
            n = _check_repeat(item.get("repeat", 1), join_path(p, "repeat"))
            layer_name, share = item.get("name"), item.get("share")
            for key, val in (("name", layer_name), ("share", share)):
                if val is not None and not isinstance(val, str):
                    raise ConfigError(join_path(p, key), f"must be a string, got {val!r}")
            overrides = {k: v for k, v in item.items() if k not in LAYER_KEYS}
            if share is not None and (overrides or layer_name):
                key = "name" if layer_name else sorted(overrides)[0]
                raise ConfigError(join_path(p, key), f"a layer that shares {share!r} takes its config "
                                                     "from it; remove this key")
            if layer_name and n > 1:
                raise ConfigError(join_path(p, "name"), f"layer name {layer_name!r} would repeat {n} times; "
                                                        "use 'share' on the copies")
            _too_many(len(out) + n, join_path(p, "repeat"))
            out.extend(_Raw(name, overrides, p, layer_name, share) for _ in range(n))
        else:
            raise ConfigError(p, "a layer needs 'block', 'pattern', or 'repeat' with 'body'")
    return out


def parse_arch(data: Any, source: str | None = None) -> Arch:
    """Validate and normalise an architecture mapping (already loaded from YAML)."""
    try:
        return _parse(data)
    except ConfigError as e:
        raise e.with_source(source) if source else e


def _parse(data) -> Arch:
    if not isinstance(data, dict):
        raise ConfigError("", f"the file must hold a mapping (name:, d_model:, layers: ...), "
                              f"got {type(data).__name__}")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(str(key), f"unknown top-level key{suggest(str(key), TOP_LEVEL)}; "
                                        f"known: {', '.join(TOP_LEVEL)}")
    model = ModelConfig.from_dict({k: v for k, v in data.items() if k in ModelConfig.__dataclass_fields__},
                                  d_model=0)
    d = model.d_model

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("defaults", "must map block names to settings, e.g. {sal: {capacity: 0.15}}")
    for block, settings in defaults.items():
        spec = get_block(block, join_path("defaults", str(block)))
        # keys, types and ranges here; checks against d_model where a layer uses them
        spec.config_cls.from_dict(settings or {}, d, join_path("defaults", block), cross_check=False)

    if "layers" in data and "pattern" in data:
        raise ConfigError("pattern", "give either 'layers' or 'pattern', not both")
    if "layers" in data:
        raws = _expand(data["layers"], "layers")
    elif "pattern" in data:
        if not isinstance(data["pattern"], str):
            raise ConfigError("pattern", "must be a string of block letters")
        raws = [_Raw(block_for_code(c).name, {}, "pattern") for c in parse_pattern(data["pattern"], "pattern")]
    else:
        raise ConfigError("layers", "missing: list the layers (or give a 'pattern')")

    layers: list[LayerSpec] = []
    named: dict[str, LayerSpec] = {}
    for raw in raws:
        if raw.share is not None:
            if raw.share not in named:
                raise ConfigError(join_path(raw.path, "share"),
                                  f"no earlier layer is named {raw.share!r}{suggest(raw.share, named)}")
            target = named[raw.share]
            if target.block != raw.block:
                raise ConfigError(join_path(raw.path, "share"),
                                  f"{raw.share!r} is a {target.block} layer, this one is {raw.block}")
            layers.append(LayerSpec(raw.block, target.config, raw.path, share=raw.share))
            continue
        settings = {**(defaults.get(raw.block) or {}), **raw.overrides}
        cfg = REGISTRY[raw.block].config_cls.from_dict(settings, d, raw.path)
        spec = LayerSpec(raw.block, cfg, raw.path, name=raw.name)
        if raw.name is not None:
            if raw.name in named:
                raise ConfigError(join_path(raw.path, "name"), f"layer name {raw.name!r} is used twice")
            named[raw.name] = spec
        layers.append(spec)
    arch = Arch(model, tuple(layers))
    _check_size(arch)
    return arch


def _check_size(arch: Arch) -> None:
    """Refuse, before anything is allocated, a model whose analytic size is past MAX_PARAMS."""
    from .analysis import num_params  # analysis imports this module

    n = num_params(arch)
    if n > MAX_PARAMS:
        raise ConfigError("d_model", f"the model would have {n:.3g} parameters, more than the limit "
                                     f"{MAX_PARAMS:.3g} (raise it with HYBRIDLAB_MAX_PARAMS)")


def load_arch(path: str | Path) -> Arch:
    """Read, validate and normalise an architecture YAML file."""
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise ConfigError("", "file not found", src)
    if path.is_dir():
        raise ConfigError("", "is a folder, expected a YAML file", src)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"not valid YAML{where}: {problem}", src) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not a text file (cannot decode as UTF-8)", src) from None
    if data is None:
        raise ConfigError("", "the file is empty", src)
    return parse_arch(data, src)
