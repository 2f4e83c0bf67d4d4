"""Reading and writing frozen config dataclasses: raw values (TOML, CLI strings, Flower scalars) coerced to each
field's annotated type, dotted keys nested and merged, CLI ``key=value`` overrides parsed, and TOML rendered.

Generic over any tree of dataclasses; :mod:`fedge.common.config` applies it to the whole run config.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from fedge.common.config_check import ConfigError, check, fail

__all__ = ["build", "coerce", "flatten", "merge", "nest", "parse_overrides", "render_toml"]


def render_toml(flat: Mapping[str, Any]) -> str:
    """A TOML document of flat dotted keys: top-level keys first, then one table per first key part."""
    top = {k: v for k, v in flat.items() if "." not in k}
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    sections: dict[str, list[str]] = {}
    for k, v in flat.items():
        if "." in k:
            sec, name = k.split(".", 1)
            sections.setdefault(sec, []).append(f"{name} = {_toml_value(v)}")
    for sec, body in sections.items():
        lines += ["", f"[{sec}]", *body]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat dotted keys of a nested mapping (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Coerce a raw (TOML / CLI string / Flower scalar) value to the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        check(value in choices, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple,) or tp is tuple:
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        fail(key, f"expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            fail(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, f"expected a number, got {value!r}")
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


def build(cls: type, raw: Mapping[str, Any], prefix: str = "", removed: Mapping[str, str] | None = None) -> Any:
    """An instance of the dataclass ``cls`` from a nested mapping, coercing every value to its field's type.

    Keys in ``removed`` (dotted, with the reason they went) are skipped with a warning; any other unknown key
    raises :class:`ConfigError` naming it and the keys known at that level.
    """
    removed = removed or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if key in removed:
            warnings.warn(f"config key '{key}' is no longer used ({removed[key]}); ignored", stacklevel=2)
            continue
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"config key '{key}': unknown key (known here: {known})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            check(isinstance(v, Mapping), key, "expected a table of keys")
            kwargs[k] = build(tp, v, key + ".", removed)  # type: ignore[arg-type]
        else:
            if isinstance(tp, types.UnionType):
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            kwargs[k] = coerce(key, v, tp)
    return cls(**kwargs)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A nested mapping of flat dotted keys; a key that is both a value and a table raises :class:`ConfigError`."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"config key '{key}': '{p}' is a value, not a table")
            d = nxt
        d[parts[-1]] = v
    return out


def merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` overlaid by ``b``, tables merged key by key (neither input changes)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse CLI ``key=value`` overrides (values parsed as TOML scalars when possible, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        try:
            out[k] = tomllib.loads(f"x = {v}")["x"]
        except tomllib.TOMLDecodeError:
            out[k] = v
    return out
