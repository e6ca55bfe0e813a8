"""The one config mechanism: typed, frozen, keyword-only dataclasses built from plain dicts (parsed TOML,
a checkpoint's or results file's config, command-line options).

Every file a user writes (run config, study file, its `[hpo]` table, conversion options) is a tree of
such dataclasses. `build(cls, values, where)` checks each key against the field annotations (bool, int,
float, str, `Literal[...]` choices, tuples, dicts, optional values and nested dataclasses) and
raises `ConfigError` in one shape: `WHERE: KEY = VALUE: what is allowed`. Cross-field rules live in each
dataclass's `__post_init__`, which raises `ConfigError` naming its key; `build` prefixes the file.
Inside `all_problems(where)` nothing raises at the first problem: every `require` and every key's type
check adds its problem to a list, and the block ends with one ConfigError naming them all (a user with
three bad values learns of the three in one run).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from stacktrain.errors import ConfigError

__all__ = ["all_problems", "build", "coerce", "parse_value", "require", "to_dict", "valid_keys"]

_PROBLEMS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


@contextlib.contextmanager
def all_problems(where: str):
    """Collect the problems of the config built in the block; raise them in one ConfigError at its end."""
    token = _PROBLEMS.set([])
    try:
        yield
        problems = _PROBLEMS.get()
    finally:
        _PROBLEMS.reset(token)
    if len(problems) == 1:
        raise ConfigError(f"{where}: {problems[0]}")
    if problems:
        raise ConfigError(f"{where}: {len(problems)} problems: {'; '.join(problems)}")


def _collected(message: str) -> bool:
    """Inside `all_problems`: note the problem and go on (True); else the caller raises."""
    problems = _PROBLEMS.get()
    if problems is None:
        return False
    if message not in problems:
        problems.append(message)
    return True


def valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def type_name(tp: Any) -> str:
    """What a user must write for annotation `tp`, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(type_name(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " (or left out)"
    if origin is dict or tp is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against annotation `tp` and return it in the field's form (tuples, floats, ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in args):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, where)
    if tp is Any:
        return value
    ok = False
    if origin is typing.Literal:
        ok = value in args and isinstance(value, type(args[0]))
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) == len(args):
            return tuple(coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    elif (origin is dict or tp is dict) and isinstance(value, dict):
        if len(args) == 2 and args[1] is not Any:
            return {k: coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
        return dict(value)
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value, where, prefix=key)
    elif origin not in (tuple, dict) and tp not in (dict,) and not dataclasses.is_dataclass(tp):
        raise AssertionError(f"config field {key} has an unsupported annotation {tp!r}")
    if ok:
        return value
    verb = "choose" if origin is typing.Literal else "expected"
    raise ConfigError(f"{where}: {key} = {value!r}: {verb} {type_name(tp)}")


def build(cls: type, values: Any, where: str, prefix: str = "") -> Any:
    """`cls(**values)` with every key and value checked; `prefix` names the table in messages."""
    table = f"[{prefix}]" if prefix else "the top level"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: {prefix or 'the file'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = valid_keys(cls)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        named = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {named}; valid keys of {table}: {', '.join(valid)}")
    kw = {}
    for k, v in values.items():
        try:
            kw[k] = coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, where)
        except ConfigError as e:  # collecting: this key keeps its default, the others are checked on
            if not _collected(str(e).removeprefix(f"{where}: ")):
                raise
    try:
        return cls(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """The one shape of a cross-field check in `__post_init__`: `KEY = VALUE: ALLOWED`."""
    if not ok:  # command-line options read as typed: `--workers 0: ...`; file keys as `key = value: ...`
        message = f"{key} {value}: {allowed}" if key.startswith("--") else f"{key} = {value!r}: {allowed}"
        if not _collected(message):
            raise ConfigError(message)


def parse_value(text: str) -> Any:
    """A TOML literal (1e-3, true, [16, 32, 32], "x"), or the text itself when it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def is_text(tp: Any) -> bool:
    """Fields whose values are names: `run_name=2024` stays the string "2024"."""
    if tp is str:
        return True
    args = typing.get_args(tp)
    return _is_optional(tp) and str in args


def to_dict(obj: Any) -> Any:
    """Nested plain dicts (tuples as lists, None kept): for JSON, TOML and checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(x) for k, x in obj.items()}
    return obj


def preset_names(package: str) -> list[str]:
    from importlib.resources import files
    return sorted(p.name.removesuffix(".toml") for p in (files(package) / "presets").iterdir()
                  if p.name.endswith(".toml"))


def resolve_file(arg: str | Path, package: str, what: str) -> Path:
    """A user's file, or a packaged preset named `NAME` or `preset:NAME` (the files live in site-packages
    after a normal install, so a name is the way to reach them)."""
    from importlib.resources import files
    text = str(arg)
    path = Path(text)
    if not text.startswith("preset:") and (path.exists() or path.suffix or "/" in text):
        return path
    name = text.removeprefix("preset:")
    found = files(package) / "presets" / f"{name}.toml"
    if not found.is_file():
        raise ConfigError(f"{text}: no such {what} file, and no packaged preset of that name; presets: "
                          f"{', '.join(preset_names(package))}")
    return Path(str(found))


def paths_base(path: Path, package: str) -> Path | None:
    """Where the relative paths inside file `path` start: its folder, or None (the current directory)
    for one of `package`'s packaged presets, whose relative paths are templates."""
    from importlib.resources import files
    preset = Path(path).resolve().parent == Path(str(files(package) / "presets")).resolve()
    return None if preset else Path(path).parent


def _path_slots(raw: dict[str, Any], key: str):
    """(table, leaf) for every place a dotted key (`*` matches any table name) holds a non-empty string."""
    head, _, rest = key.partition(".")
    names = [k for k in raw if isinstance(raw[k], dict)] if head == "*" else [head]
    for name in names:
        if not rest:
            if isinstance(raw.get(name), str) and raw[name]:
                yield raw, name
        elif isinstance(raw.get(name), dict):
            yield from _path_slots(raw[name], rest)


def anchor_paths(raw: dict[str, Any], keys: tuple[str, ...], base: Path | None) -> dict[str, Any]:
    """Make the paths at `keys` of a raw nested dict absolute, a relative one taken from `base` (the
    folder of the file that names it; None: the current directory, as for the command line's values).
    In place; returns `raw`."""
    for key in keys:
        for table, leaf in _path_slots(raw, key):
            table[leaf] = os.path.abspath(os.path.join(base or os.curdir, os.path.expanduser(table[leaf])))
    return raw


def relative_paths(raw: dict[str, Any], keys: tuple[str, ...], base: Path) -> dict[str, Any]:
    """The inverse of `anchor_paths` for a file written into `base`: each path at `keys` relative to it,
    so the file still reads right after its whole tree is moved. In place; returns `raw`."""
    for key in keys:
        for table, leaf in _path_slots(raw, key):
            table[leaf] = os.path.relpath(os.path.abspath(table[leaf]), os.path.abspath(base))
    return raw


def check_choices(obj: Any, section: str) -> None:
    """Refuse a `Literal[...]` field holding another value, also when the dataclass is built in code."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if typing.get_origin(tp) is typing.Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{section}.{name} = {value!r}; choose {type_name(tp)}")
