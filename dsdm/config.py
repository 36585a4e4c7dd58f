"""Config dataclasses <-> YAML/dicts, with loud failures.

Each stage module defines its own `@dataclass` config (defaults and a docstring per field, validation in
`__post_init__`). This module only converts: `from_dict` builds a (nested) dataclass from plain data and rejects
unknown keys and wrong types naming the dotted key; `apply_overrides` applies `a.b=value` strings (values parsed as
YAML); `load_config` does file -> overrides -> dataclass; `to_dict` / `save_config` go back. The resolved config is
saved next to every output (see dsdm.io.mark_done).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _arms(tp: Any) -> list:
    """The non-None members of a Union, in order."""
    return [arm for arm in typing.get_args(tp) if arm is not type(None)]


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert dicts to dataclasses, lists to tuples where asked."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(arm, value, key)
            except ValueError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: X's own message names the key and the fix
            raise ValueError(errors[0])
        reasons = "; ".join(f"as {_type_name(arm)}: {err}" for arm, err in zip(_arms(tp), errors))
        raise ValueError(f"config key {key!r}: {value!r} matches none of {_type_name(tp)} ({reasons})")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {key!r} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ValueError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys or wrong types raise ValueError naming the dotted key."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        keys = ", ".join(prefix + k for k in unknown)
        raise ValueError(f"unknown config key(s): {keys}. Known keys: {', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict (tuples become lists so YAML/JSON round-trip)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def without_new_defaults(settings: dict, new_defaults: dict) -> dict:
    """`settings` without the keys that still hold their `new_defaults` value: fields added after records existed
    stay out of a completion key at their default, so those records remain valid."""
    return {k: v for k, v in settings.items() if k not in new_defaults or v != new_defaults[k]}


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply dotted overrides ('featurize.proj_dim=512') to a nested dict; values are parsed as YAML scalars."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _deepcopy(d: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; an empty file is {}. Errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """YAML file (optional) -> dotted overrides -> validated dataclass."""
    data = load_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))


def dump_yaml(cfg: Any) -> str:
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return yaml.safe_dump(data, sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from dsdm.io import atomic_write_text

    atomic_write_text(path, dump_yaml(cfg))
