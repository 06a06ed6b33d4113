"""Frozen, validated configs built from YAML mappings.

A config is a frozen dataclass whose fields carry their meaning and their range in metadata:

    capacity: float = field(0.15, "share of tokens the gate aims to select", gt=0, le=1)

`from_dict` rejects unknown keys (suggesting the closest one), checks types and ranges, and
names the offending YAML path in the error.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Mapping



class ConfigError(ValueError):
    """A problem in a user's YAML, named by its path (`layers[0].body[1].capacity`)."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.message, self.source = path, message, source
        super().__init__(str(self))

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.path, self.message, source)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.source, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


def field(default: Any, help: str, *, choices: tuple | None = None, gt=None, ge=None, lt=None,
          le=None, nullable: bool = False):
    meta = dict(help=help, choices=choices, gt=gt, ge=ge, lt=lt, le=le, nullable=nullable)
    return dataclasses.field(default=default, metadata=meta)


def join_path(prefix: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(t) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def check_value(path: str, value: Any, ftype, meta: Mapping) -> Any:
    """Coerce and check one value against a field's type and range; returns the value."""
    if value is None:
        if meta.get("nullable"):
            return None
        raise ConfigError(path, "must not be empty (null)")
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every comparison below; inf is no setting
            raise ConfigError(path, f"must be a finite number, got {value!r}")
    elif ftype is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
    lo = ("gt", meta.get("gt")) if meta.get("gt") is not None else ("ge", meta.get("ge"))
    hi = ("lt", meta.get("lt")) if meta.get("lt") is not None else ("le", meta.get("le"))
    bad = ((lo[1] is not None and (value <= lo[1] if lo[0] == "gt" else value < lo[1]))
           or (hi[1] is not None and (value >= hi[1] if hi[0] == "lt" else value > hi[1])))
    if bad:
        raise ConfigError(path, f"must be {describe_range(meta)}, got {value!r}")
    return value


def describe_range(meta: Mapping) -> str:
    lo_b = "(" if meta.get("gt") is not None else "["
    lo = meta.get("gt") if meta.get("gt") is not None else meta.get("ge")
    hi_b = ")" if meta.get("lt") is not None else "]"
    hi = meta.get("lt") if meta.get("lt") is not None else meta.get("le")
    if lo is None and hi is None:
        return "any value"
    if hi is None:
        return f"> {lo}" if lo_b == "(" else f">= {lo}"
    if lo is None:
        return f"< {hi}" if hi_b == ")" else f"<= {hi}"
    return f"in {lo_b}{lo}, {hi}{hi_b}"


def _resolve_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    args = typing.get_args(t)
    if args and type(None) in args:  # Optional[X]
        t = next(a for a in args if a is not type(None))
    return t


class Config:
    """Mixin for frozen dataclass configs."""

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], d_model: int, path: str = "", cross_check: bool = True):
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"must be a mapping of settings, got {type(data).__name__}")
        known = {f.name: f for f in cls.fields()}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(join_path(path, str(key)),
                                  f"unknown key for {cls.kind()}{suggest(str(key), known)}")
            f = known[key]
            kwargs[key] = check_value(join_path(path, key), value, _resolve_type(cls, f), f.metadata)
        cfg = cls(**kwargs)
        if cross_check:
            cfg.validate(d_model, path)
        return cfg

    @classmethod
    def kind(cls) -> str:
        return getattr(cls, "block_name", cls.__name__)

    def validate(self, d_model: int, path: str = "") -> None:
        """Cross-field checks against the model width; raise ConfigError(join_path(path, key), ...)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.fields()}


def is_plain_name(name: str) -> bool:
    """A name that is one folder inside its parent: no separator, no '..', not absolute (run
    names, study names: what a user names must not write outside the folder they chose)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
