"""Typed configuration: frozen dataclasses loaded from YAML, with presets and `--set a.b=c` overrides.

Every concept owns one frozen dataclass (``UNetConfig`` in ``unet.py``, ...); this module only knows
how to turn YAML into those dataclasses and back:

* unknown keys are an error that names the key, the dataclass and the file;
* values are checked against the field's type hint (``int``, ``float``, ``bool``, ``str``,
  ``Optional[...]``, ``list[...]``/``tuple[...]``, ``Literal[...]``, ``dict``, nested dataclasses);
* a nested dataclass field may be given as a string: the name of a preset, i.e. the YAML file
  ``configs/<section>/<name>.yaml`` (section = the field's ``metadata["preset"]``, else its name),
  or a path to a YAML file;
* ``--set a.b=c`` overrides are applied after presets are expanded; ``c`` is parsed as YAML, so
  ``--set model.attention_resolutions=[32,16,8]`` and ``--set model.feature_dim=null`` work.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

CONFIGS_DIR = Path(os.environ.get("RCDM_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))


class ConfigError(ValueError):
    """A configuration file or override that does not fit its dataclass."""


# --- presets --------------------------------------------------------------------------------------


def preset_path(section: str, name: str) -> Path:
    """The YAML file of preset ``name`` in ``configs/<section>/``, or ``name`` itself if it is a file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = CONFIGS_DIR / section / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS_DIR / section).glob("*.yaml"))
        raise ConfigError(f"unknown {section} preset '{name}': known presets are {known} (in {path.parent})")
    return path


def list_presets(section: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / section).glob("*.yaml"))


def read_yaml(path: str | Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# --- type checking --------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section(field: dataclasses.Field) -> str:
    return field.metadata.get("preset", field.name)


def _coerce(value: Any, tp: Any, where: str, source: str, section: str | None = None) -> Any:
    """Check ``value`` against type hint ``tp`` and convert it (lists to tuples, ints to floats...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, source, section)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{source}: '{where}' = {value!r} fits none of {tp}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            path = preset_path(section or where.rsplit(".", 1)[-1], value)
            return from_dict(tp, read_yaml(path), source=str(path), prefix=f"{where}.")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{where}' must be a mapping or a preset name, got {value!r}")
        return from_dict(tp, value, source=source, prefix=f"{where}.")
    if origin in (list, tuple, Iterable, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{where}' must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{source}: '{where}' must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: '{where}' must be a {tp.__name__}, got {value!r}")
    return value


# --- dataclass <-> dict ---------------------------------------------------------------------------


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or cls.__name__}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' for {cls.__name__}; known keys: {sorted(fields)}"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}", source, _section(fields[name]))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing required key '{prefix}{missing[0]}' for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        where = f" at {prefix.rstrip('.')}" if prefix else ""
        raise ConfigError(f"{source}: invalid {cls.__name__}{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able data (tuples become lists) from a dataclass instance."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- overrides ------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=[1, 2]"`` -> (["a", "b"], [1, 2]); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _expand_presets(cls: type, data: dict, source: str) -> dict:
    """Replace preset names in ``data`` (for nested dataclass fields) by the preset's contents."""
    out = dict(data)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        tp = _unwrap_optional(hints[f.name])
        value = out[f.name]
        if _is_dataclass_type(tp):
            if isinstance(value, str):
                path = preset_path(_section(f), value)
                out[f.name] = _expand_presets(tp, read_yaml(path), str(path))
            elif isinstance(value, Mapping):
                out[f.name] = _expand_presets(tp, dict(value), source)
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def apply_overrides(cls: type, data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` strings to the (preset-expanded) dict ``data`` of dataclass ``cls``."""
    data = _expand_presets(cls, data, "<config>")
    for item in overrides:
        path, value = parse_override(item)
        node_cls, node = cls, data
        for depth, key in enumerate(path):
            if node_cls is None:
                node[key] = value if depth == len(path) - 1 else node.setdefault(key, {})
                node = node[key]
                continue
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if key not in fields:
                where = ".".join(path[: depth + 1])
                raise ConfigError(
                    f"--set {item}: unknown key '{where}' for {node_cls.__name__}; known keys: {sorted(fields)}"
                )
            tp = _unwrap_optional(_hints(node_cls)[key])
            if depth == len(path) - 1:
                if _is_dataclass_type(tp) and isinstance(value, str):
                    value = _expand_presets(tp, read_yaml(preset_path(_section(fields[key]), value)), value)
                node[key] = value
            else:
                child = node.get(key)
                if child is None:
                    child = to_dict(_default_of(fields[key])) or {}
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {item}: '{'.'.join(path[: depth + 1])}' is not a mapping")
                node[key] = child = dict(child)
                node = child
                node_cls = tp if _is_dataclass_type(tp) else None
    return data


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), data: Mapping | None = None
) -> T:
    """Load ``cls`` from YAML file ``path`` (or from ``data``), then apply ``--set`` overrides."""
    if path is not None and data is not None:
        raise ValueError("give a path or data, not both")
    source = str(path) if path is not None else "<dict>"
    overrides = list(overrides)
    if overrides:  # a bad value may come from either
        source += " with --set " + " ".join(overrides)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = read_yaml(path)
    else:
        raw = dict(data or {})
    merged = apply_overrides(cls, raw, overrides)
    return from_dict(cls, merged, source=source)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)
