"""Typed dataclass configs from YAML files plus dotted command-line overrides.

The loader is schema-agnostic: give it any dataclass (nested arbitrarily deep) and it
checks every key and value against the type hints, so a typo or a wrong type fails at
start-up with a one-line message instead of hours into a training run.

    cfg = load_config(TrainConfig, "configs/grpo.yaml", ["actor.optim.lr=1e-5", "rollout.n=8"])

Supported field types: int, float, str, bool, ``X | None``, other unions, list[X],
tuple[X, ...], tuple[X, Y], dict[K, X], Literal[...], nested dataclasses and typing.Any.
After a dataclass is built, its ``validate(self)`` method (if any) is called, children
before parents, so schemas can raise ConfigError for cross-field rules.
"""

from __future__ import annotations

import collections.abc as abc
import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "save_config", "apply_overrides"]

T = TypeVar("T")
_CMDLINE = "command line"


class ConfigError(ValueError):
    """A problem with user-supplied configuration; the message is one user-facing line."""


# --------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from a YAML file (optional) then apply ``key.sub=value`` overrides.

    Overrides beat the file; keys absent from both take the dataclass defaults.
    Raises ConfigError for a missing/unparsable file, unknown keys, wrong types,
    missing required keys, or a failing ``validate()`` hook.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = os.fspath(path)
        data = _read_yaml(source)
    data, overridden = _apply_overrides(data, overrides, cls)
    return _build(cls, data, "", _Ctx(source, overridden))


def from_dict(cls: type[T], data: Mapping, *, source: str = "<dict>") -> T:
    """Build dataclass ``cls`` from a plain (nested) mapping, type-checking every value.

    ``source`` only appears in error messages (e.g. the file the mapping came from).
    """
    return _build(cls, data, "", _Ctx(source, frozenset()))


def to_dict(cfg: Any) -> dict:
    """Convert a config dataclass to a nested plain dict that yaml.safe_dump accepts.

    Tuples become lists; only ``init=True`` fields are emitted, so the result loads back.
    """
    if not _is_dataclass_type(type(cfg)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (field order kept) that ``load_config`` reads back to an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def apply_overrides(data: dict, overrides: Sequence[str], cls: type) -> dict:
    """Return a copy of ``data`` with each ``a.b.c=value`` override applied.

    Paths are checked against ``cls`` (unknown keys are errors attributed to the command
    line). Values are parsed with yaml.safe_load, so ``x=[1,2]`` gives a list; for str
    fields the raw text is kept so ``name=2024`` stays a string. A mapping assigned to a
    nested dataclass merges into it; anything else replaces the old value.
    """
    return _apply_overrides(data, overrides, cls)[0]


# --------------------------------------------------------------------------- internals


@dataclasses.dataclass(frozen=True)
class _Ctx:
    source: str  # where the bulk of the data came from (file path or "<dict>")
    overridden: frozenset  # dotted keys set on the command line, for error attribution

    def where(self, key: str) -> str:
        """'on the command line' if ``key`` (or a parent) was overridden, else 'in <source>'."""
        for k in self.overridden:
            if key == k or key.startswith((k + ".", k + "[")):
                return _at(_CMDLINE)
        return _at(self.source)


def _at(source: str) -> str:
    return "on the command line" if source == _CMDLINE else f"in {source}"


def _read_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found; check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML in '{path}'{line}: {' '.join(str(problem).split())}") from None
    if data is None:  # an empty file is a valid "all defaults" config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level of '{path}' must be a mapping of keys, got {type(data).__name__}")
    return data


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations from `from __future__ import annotations`.
    return typing.get_type_hints(cls)


def _union_args(tp: Any) -> tuple | None:
    origin = typing.get_origin(tp)
    return typing.get_args(tp) if origin in (Union, types.UnionType) else None


def _strip_optional(tp: Any) -> Any:
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if tp is type(None):
        return "None"
    if _is_dataclass_type(tp):
        return f"a mapping ({tp.__name__})"
    args = _union_args(tp)
    if args is not None:
        return " | ".join(_type_name(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", repr(tp))


def _unknown_key(name: str, prefix: str, valid: Sequence[str], where: str) -> ConfigError:
    listing = f"(valid keys: {', '.join(valid)})"
    match = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{prefix}{match[0]}'? " if match else " "
    return ConfigError(f"unknown key '{prefix}{name}' {where}{hint}{listing}")


def _build(cls: type, data: Any, prefix: str, ctx: _Ctx) -> Any:
    """Construct dataclass ``cls`` from mapping ``data``; ``prefix`` is the dotted path so far."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        key = prefix.rstrip(".") or "<top level>"
        raise ConfigError(
            f"key '{key}' expects a mapping ({cls.__name__}), got {data!r} ({type(data).__name__}) {ctx.where(key)}"
        )
    fields, hints = _init_fields(cls), _hints(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(str(name), prefix, list(fields), ctx.where(f"{prefix}{name}"))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'; set it in the config file or with {key}=... on the command line")
    obj = cls(**kwargs)
    # Children were built (and validated) inside _convert above, so this runs children-first.
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _convert(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """Check/convert one value against type hint ``tp``; raise ConfigError naming ``key``."""

    def bad(expected: str | None = None) -> ConfigError:
        exp = expected or _type_name(tp)
        return ConfigError(f"key '{key}' expects {exp}, got {value!r} ({type(value).__name__}) {ctx.where(key)}")

    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise bad()
        return _build(tp, value, key + ".", ctx)
    args = _union_args(tp)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, ctx)
            except ConfigError:
                continue
        raise bad()
    if value is None:  # only Optional / Any / Literal[None] admit None
        if typing.get_origin(tp) is Literal and None in typing.get_args(tp):
            return None
        raise bad()
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # Compare type too: Literal[1] must not accept True (True == 1 in Python).
        for allowed in targs:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # quoted numbers in YAML / on the command line
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-5` as a string, not a float
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if origin in (list, abc.Sequence) or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and targs and not (len(targs) == 2 and targs[1] is Ellipsis):
            if len(value) != len(targs):
                raise bad(f"{_type_name(tp)} ({len(targs)} items)")
            return tuple(_convert(v, t, f"{key}[{i}]", ctx) for i, (v, t) in enumerate(zip(value, targs)))
        item = targs[0] if targs else Any
        items = [_convert(v, item, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, abc.Mapping):
        if not isinstance(value, Mapping):
            raise bad()
        ktp, vtp = targs if targs else (Any, Any)
        return {_convert(k, ktp, f"{key} (key {k!r})", ctx): _convert(v, vtp, f"{key}.{k}", ctx) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    raise TypeError(f"unsupported config field type {tp!r} for key '{key}'")


def _plain(obj: Any) -> Any:
    if _is_dataclass_type(type(obj)):
        return {name: _plain(getattr(obj, name)) for name in _init_fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _accepts_str(tp: Any) -> bool:
    return _strip_optional(tp) is str


def _apply_overrides(data: Mapping, overrides: Sequence[str], cls: type) -> tuple[dict, frozenset]:
    out = copy.deepcopy(dict(data))
    keys: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. actor.optim.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key segment; use key.sub=value")
        # Walk types and data together so unknown keys are caught before building.
        node, tp = out, cls
        for depth, name in enumerate(parts):
            prefix = ".".join(parts[:depth])
            prefix = prefix + "." if prefix else ""
            tp = _strip_optional(tp)
            if _is_dataclass_type(tp):
                fields = _init_fields(tp)
                if name not in fields:
                    raise _unknown_key(name, prefix, list(fields), _at(_CMDLINE))
                tp = _hints(tp)[name]
            elif typing.get_origin(tp) in (dict, abc.Mapping):
                targs = typing.get_args(tp)
                tp = targs[1] if targs else Any
            elif tp is not Any:
                raise ConfigError(
                    f"cannot set '{dotted}' on the command line: '{prefix.rstrip('.')}' is "
                    f"{_type_name(tp)}, not a nested config"
                )
            if depth < len(parts) - 1:
                if not isinstance(node.get(name), dict):
                    node[name] = {}  # nothing (or None) in the file yet: start an empty section
                node = node[name]
        parsed = yaml.safe_load(raw) if raw.strip() else None
        if _accepts_str(tp) and parsed is not None and not isinstance(parsed, str):
            parsed = raw  # `name=2024` means the string "2024" for a str field
        leaf = parts[-1]
        if _is_dataclass_type(_strip_optional(tp)) and isinstance(parsed, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = _deep_merge(node[leaf], parsed)
        else:
            node[leaf] = parsed
        keys.append(dotted)
    return out, frozenset(keys)


def _deep_merge(base: dict, new: Mapping) -> dict:
    merged = dict(base)
    for k, v in new.items():
        merged[k] = _deep_merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged
