"""Typed, strict configuration: dataclasses loaded from YAML plus dotted overrides.

Every component keeps its knobs in a ``@dataclass`` whose fields carry a docstring
(the string literal right after the field). ``load_config`` builds such a dataclass
from a YAML file and ``key.sub=value`` overrides; unknown keys and values of the
wrong type raise :class:`ConfigError` naming the file and the dotted key, because a
typo that silently falls back to a default can waste a whole training run.

The command line reads the same classes: :func:`add_config_args` turns fields into
``--options`` (type, default and help from the field) and :func:`config_keys_help` lists
every ``key=value`` a class accepts, so a default or its description has one home.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names where."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            out = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item = args[0] if args else Any
            out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys under '{where or '<root>'}': {sorted(names)}"
        )
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if isinstance(value, dict):
            default = _default_of(fields[key])
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                # A partial section changes only the keys it names: the rest keep the *field's*
                # default (e.g. a default_factory's tuned values), not the nested class's defaults.
                value = _deep_merge(to_dict(default), value)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _default_of(f: dataclasses.Field) -> Any:
    """The value a dataclass field takes when not given (None when it has no default)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys replaced, recursing where both hold a mapping."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) config dataclass, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted`` = "a.b.c", creating sections as needed."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.max_steps=5", "out_dir=/tmp/x"]`` -> ``[("train.max_steps", 5), ...]`` (YAML-typed)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        out.append((key.strip(), value))
    return out


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path that exists, or the name of a YAML shipped in ``geomerase.configs``."""
    p = Path(path)
    if p.exists():
        return p
    from importlib import resources

    name = p.name if p.suffix else p.name + ".yaml"
    shipped = resources.files("geomerase.configs") / name
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"config file {str(path)!r} not found (nor shipped as geomerase/configs/{name})")


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    tree: dict = {}
    where = "<defaults>"
    if path is not None:
        resolved = resolve_config_path(path)
        where = str(resolved)
        try:
            tree = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}: top level must be a mapping")
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    try:
        return from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring literal written under it in the class body."""
    try:
        tree = ast.parse(inspect.getsource(cls).lstrip())
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = inspect.cleandoc(node.value.value)
    return docs


def _option_kind(tp: Any, where: str) -> dict[str, Any]:
    """argparse ``type``/``choices``/``action`` for a scalar annotation (``X | None`` reads as ``X``)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _option_kind(args[0], where)
    if get_origin(tp) is Literal:
        choices = list(get_args(tp))
        return {"type": type(choices[0]), "choices": choices}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"{where}: a field of type {_type_name(tp)} has no command-line option")


def add_config_args(parser: argparse.ArgumentParser, cls: type, names: Sequence[str], dest_prefix: str = "") -> None:
    """Add ``--kebab-name`` options to ``parser`` for the fields ``names`` of dataclass ``cls``.

    The option's type comes from the annotation (int, float, str; a ``Literal`` gives choices; a
    bool gives ``--name/--no-name``; ``X | None`` reads as X), its default is the field's default
    and its help is the field's docstring plus that default. The value lands in
    ``dest_prefix + name``.
    """
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        if name not in fields:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        default = _default_of(fields[name])
        kind = _option_kind(hints[name], f"{cls.__name__}.{name}")
        if "type" in kind and "choices" not in kind:
            kind["metavar"] = name.upper()  # not the prefixed dest
        doc = " ".join(docs.get(name, "").split()).replace("%", "%%")
        parser.add_argument("--" + name.replace("_", "-"), dest=dest_prefix + name, default=default,
                            help=f"{doc} (default: {'None' if default is None else _yaml_value(default)})".lstrip(),
                            **kind)


def _yaml_value(value: Any) -> str:
    """``value`` as written on the command line or in YAML (``null``, ``true``, ``[a, b]``)."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 30).strip()
    return text.removesuffix("...").strip()


def config_keys_help(obj: Any, prefix: str = "", width: int = 96) -> str:
    """Every ``key=value`` that ``load_config`` accepts for config dataclass ``obj`` (an instance,
    or a class with defaults for every field), one entry per key: ``key=default`` over its
    docstring. Nested dataclasses appear as dotted keys (``train.max_steps``) with the defaults
    of the field that holds them."""
    if isinstance(obj, type):
        obj = obj()
    docs, lines = field_docs(type(obj)), []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines.append(config_keys_help(value, key + ".", width))
            continue
        lines.append(f"  {key}={_yaml_value(value)}")
        doc = " ".join(docs.get(f.name, "").split())
        if doc:
            lines.append(textwrap.fill(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
