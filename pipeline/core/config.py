"""Typed stage configs: one frozen dataclass per params.yaml section.

Convention (one name per knob everywhere): the yaml key, the dataclass field and the keyword
argument of the library function are the same word. Each field carries an attribute docstring
(the string literal right below it); `field_docs` reads them so `--help` prints them.

`from_params` turns a params.yaml section into a config, checking that the section exists, that
no key is unknown (typos are the most common params bug) and that every value has the declared
type; the dataclass's own `__post_init__` then checks ranges with `require`, and every message
names the offending key as `section.key`. A config class that more than one section uses (the
same keys, e.g. `compress` and `classify_compress`) writes its checks with the section in its
class attribute `SECTION`; `from_mapping` renames that prefix to the section actually read.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from pipeline.core.errors import ConfigError, first_line

C = TypeVar("C")


def load_params(path: str | Path) -> dict[str, Any]:
    """Read params.yaml; raise ConfigError naming the file if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (pass --params PATH)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"{path}: not valid YAML ({where}{problem}); fix that line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(`key`: message) unless `ok`. Use in `__post_init__` range checks."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field of `cls` to its attribute docstring ('' when it has none)."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:] + [None], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, section: str) -> str:
    """Human-readable list of a config's keys, defaults and docs, for a stage's `--help`."""
    lines = [f"params.yaml section '{section}':"]
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = _default_of(f)
        if dataclasses.is_dataclass(default):
            lines.append(f"  {section}.{f.name}: (mapping) {docs.get(f.name, '')}")
            for line in describe(type(default), f"{section}.{f.name}").splitlines()[1:]:
                lines.append("  " + line)
            continue
        shown = "(required)" if default is dataclasses.MISSING else f"[default: {default!r}]"
        lines.append(f"  {section}.{f.name} {shown}")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def from_params(cls: type[C], params: dict[str, Any], section: str) -> C:
    """Build `cls` from `params[section]` (dotted for nested sections), validating every key."""
    node: Any = params
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml: section '{section}' is missing")
        node = node[part]
    return from_mapping(cls, node, section)


def with_overrides(params: dict[str, Any], section: str, overrides: str) -> dict[str, Any]:
    """`params[section]` updated with the keys of `params[overrides]` (dotted path).

    Lets one stage run several variants that differ in a few keys (a DVC `foreach` over
    `students: {kd: {alpha: 1.0}, ce: {alpha: 0.0}}`): each variant then depends on the shared
    section plus its own entry, and an override key the section does not have is an error
    naming the override's own path.
    """
    node: Any = params
    for part in overrides.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml: section '{overrides}' is missing")
        node = node[part]
    node = node or {}
    if not isinstance(node, dict):
        raise ConfigError(f"{overrides}: must be a mapping of {section} keys")
    base = params.get(section) or {}
    for key in node:
        if key not in base:
            raise ConfigError(f"{overrides}.{key}: not a key of section '{section}'")
    return {**params, section: {**base, **node}}


def from_mapping(cls: type[C], values: Any, section: str) -> C:
    """Build `cls` from a mapping; `section` prefixes every key named in an error."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            also = f"; did you mean '{section}.{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"{section}.{key}: unknown key (known: {', '.join(sorted(fields))}){also}"
            )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name not in values:
            if _default_of(f) is dataclasses.MISSING:
                raise ConfigError(f"{key}: required key is missing")
            continue
        kwargs[name] = _coerce(values[name], hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A config read from another section than the one its checks name (`SECTION`, e.g.
        # CompressConfig from `classify_compress`): name the section it was read from.
        own = getattr(cls, "SECTION", None)
        if own and section != own and str(e).startswith(f"{own}."):
            raise ConfigError(section + str(e)[len(own) :]) from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (for provenance records and hashing)."""
    return dataclasses.asdict(cfg)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it (converted only where lossless)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")  # a bug, not user input
