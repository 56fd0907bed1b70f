"""Typed stage configs: YAML file + dotted command-line overrides, strict validation.

Every stage declares one dataclass (fields may be nested dataclasses). A field's documentation is
the string literal written right under it (litgpt's pattern), read here with `ast` so that
`rlhfkit <stage> --help` and error messages can show it.

    cfg = load_config(SFTConfig, yaml_path="sft.yaml", overrides=["train.lr=1e-4", "--model.name", "x"])

Unknown keys and wrong types raise `ConfigError` (exit code 2) naming the key and close matches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from rlhfkit.runtime.errors import ConfigError

_MISSING = object()


# --------------------------------------------------------------------------- field documentation
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it, over the class and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ", ".join(repr(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- type coercion
def _coerce(value: Any, tp: Any, key: str, renamed: dict[str, str] | None = None) -> Any:
    """Convert a YAML-parsed value to `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key, renamed)
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.", renamed=renamed)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, tp: Any, key: str, renamed: dict[str, str] | None) -> Any:
    """Coerce to the first member of the union `tp` that accepts `value` (None only where allowed)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key, renamed)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """Coerce to bool, int, float or str, accepting their string spellings; other types pass through."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():  # a recipe var: "{layers}" -> "10"
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "3e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "", renamed: dict[str, str] | None = None) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    renamed = renamed if renamed is not None else getattr(cls, "RENAMED", {})
    for key, value in data.items():
        if key not in fields and prefix + key in renamed:  # a key that moved: say where to
            raise ConfigError(f"config key '{prefix}{key}' is now '{renamed[prefix + key]}'")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        f = fields[key]
        if (
            dataclasses.is_dataclass(hints[key])
            and isinstance(value, dict)
            and f.default_factory is not dataclasses.MISSING
        ):
            # Override on top of this stage's own default (e.g. SFT's train.lr), not the class defaults.
            value = merge_dicts(dataclasses.asdict(f.default_factory()), value)
        kwargs[key] = _coerce(value, hints[key], prefix + key, renamed)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


# --------------------------------------------------------------------------- overrides
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def flag_takes_value(args: list[str], i: int) -> bool:
    """Whether `--key` at args[i] takes args[i+1] as its value (else it is a bare true flag)."""
    return (
        "=" not in args[i]
        and i + 1 < len(args)
        and not args[i + 1].startswith("--")
        and not _OVERRIDE.match(args[i + 1])
    )


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`a.b=1`, `--a.b=1` or `--a.b 1` → nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if flag_takes_value(args, i):
                    i += 1
                    value = args[i]
                else:
                    value = "true"  # bare flag: --overwrite
                arg = f"{arg}={value}"
        if "=" not in arg:
            raise ConfigError(f"cannot parse argument {args[i]!r}: use key=value or --key value")
        key, raw = arg.split("=", 1)
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}' conflicts with another override")
        node[parts[-1]] = value
        i += 1
    return out


def merge_dicts(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> dict[str, Any]:
    """A YAML mapping from `path`, or a ConfigError naming the file (and line) — never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type, yaml_path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None):
    """Build `cls` from an optional YAML file plus overrides (dotted strings or a nested dict)."""
    data: dict[str, Any] = read_yaml(yaml_path, "config file") if yaml_path is not None else {}
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = merge_dicts(data, extra)
    return _build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from rlhfkit.runtime.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- help
def config_help(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """One line per field: dotted key, type, default and its docstring. Nested defaults are read from
    the parent's instance (RewardConfig's lora has r=8, not LoraConfig's class default 16)."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n  [{prefix}{f.name}] {docs.get(f.name, '')}".rstrip())
            lines.append(
                config_help(tp, prefix=f"{prefix}{f.name}.", defaults=default if default != "(required)" else None)
            )
            continue
        lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, default: {default!r})")
        if docs.get(f.name):
            lines.append(textwrap.fill(docs[f.name], width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def check_positive(cfg, names: tuple[str, ...], zero_ok: bool = False) -> None:
    """ValueError naming the first field of `names` that is not > 0 (≥ 0 with zero_ok), or not finite."""
    for name in names:
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
            raise ValueError(f"{name} must be {'≥' if zero_ok else '>'} 0, got {v}")
