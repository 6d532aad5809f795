"""Command lines and YAML presets generated from a recipe's frozen dataclass config.

Every recipe is `main(cfg)`, where `cfg` is a frozen dataclass made of small nested frozen dataclasses, each field
followed by a one-line docstring (as in `align/model/config.py`). `parse_config(RecipeConfig)` turns that class into
a command line whose `--help` lists every field with its type, default and docstring.

Flag names are the dotted path of the field with `_` and `.` both written as `-`: `output_dir` -> `--output-dir`,
`lora.r` -> `--lora-r`, `optim.weight_decay` -> `--optim-weight-decay`. The dotted spelling (`--output_dir`,
`--lora.r`, `--optim.weight_decay`) is accepted as a hidden alias. Two fields that would share a flag are an error
when the parser is built, not when someone happens to pass the flag.

Values: booleans take `--flag`, `--no-flag` or `--flag true|false`; `none` (or `null`) sets an optional field to
None; tuples and lists are comma-separated (`--optim-betas 0.9,0.95`); Literal fields accept only their choices;
`dict` fields take JSON on the command line and mappings in YAML.

Precedence: dataclass defaults < the YAML preset given by `--config FILE` < flags on the command line. A preset is
a nested mapping mirroring the dataclass (`optim: {lr: 7e-6}`) and names only what it changes. Values are converted
and checked first, then the dataclasses are built, so their `__post_init__` runs. Every error (unknown key, with a
suggestion; wrong type; failed validation) names the file and the dotted key and exits with status 2, as argparse.

`save_config` writes the resolved config as YAML beside a checkpoint; `load_config` reads it back to an equal object.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from align.files import write_text_atomic

T = TypeVar("T")
MISSING = dataclasses.MISSING
_NONE = type(None)


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the file (if any) and the dotted key."""


# PyYAML follows YAML 1.1, where `7e-6` (no dot) is a string. Learning rates are written that way, so our loader
# reads it as a float, and our dumper knows to quote the *string* "7e-6" so that it reads back as a string.
class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


# --- reading the dataclass ---------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves `from __future__ import annotations` strings


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field (`x: int = 1` then `\"\"\"...\"\"\"`), read from the source with `ast`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # bases first, so a subclass's docstring wins
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # builtins, classes made in a REPL or by make_dataclass
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _class_doc(cls: type) -> str | None:
    doc = cls.__doc__ or ""
    return None if doc.startswith(cls.__name__ + "(") else doc  # dataclass() invents "Name(a: int = 1, ...)"


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _is_nested(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _arms(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _type_name(tp: Any) -> str:
    if tp is Any or tp is _NONE:
        return "Any" if tp is Any else "None"
    if len(_arms(tp)) > 1:
        return " | ".join(map(_type_name, _arms(tp)))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _elem_types(tp: Any, n: int) -> tuple[Any, ...] | None:
    """Types of the n items of a tuple or list type; None if a fixed-length tuple type has another length."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        return args if len(args) == n else None
    return (args[0] if args else Any,) * n


def _check_type(tp: Any, key: str) -> None:
    origin = typing.get_origin(tp) or tp
    if tp is Any or tp in (bool, int, float, str, Path, _NONE) or origin is Literal:
        return
    if origin in (Union, types.UnionType, tuple, list, dict):
        for arg in typing.get_args(tp):
            if arg is not Ellipsis:
                _check_type(arg, key)
        return
    raise TypeError(f"{key}: field type {tp!r} is not supported by align.config")


@dataclasses.dataclass(frozen=True)
class _Leaf:
    key: str
    """Dotted path from the root config, e.g. `optim.lr`."""
    type: Any
    """Resolved annotation."""
    default: Any
    """Effective default (a nested field's default instance included), or MISSING."""
    doc: str
    """The field's docstring."""


def _walk(cls: type, prefix: str, base: Any, groups: dict[str, str | None]) -> list[_Leaf]:
    """The non-dataclass fields under `cls`, depth first; fills `groups` with each nested field's docstring."""
    leaves, docs = [], _field_docs(cls)
    for name, f in _fields(cls).items():
        tp, key = _hints(cls)[name], prefix + name
        default = getattr(base, name) if base is not None else _default(f)
        if _is_nested(tp):
            groups[key] = docs.get(name) or _class_doc(tp)
            leaves += _walk(tp, key + ".", None if default is MISSING else default, groups)
        else:
            _check_type(tp, key)
            leaves.append(_Leaf(key, tp, default, docs.get(name, "")))
    return leaves


# --- converting values -------------------------------------------------------------------------------------------


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Checks a value read from YAML (or given in a dict) against the type `tp`; returns it converted."""
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    arms = _arms(tp)
    if len(arms) > 1:
        if value is None and _NONE in arms:
            return None
        arms = tuple(a for a in arms if a is not _NONE)
        if len(arms) == 1:
            return _coerce(arms[0], value, key)
        for arm in arms:
            try:
                return _coerce(arm, value, key)
            except ConfigError:
                pass
        raise bad
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (tuple, list):
        elem_types = _elem_types(tp, len(value)) if isinstance(value, (list, tuple)) else None
        if elem_types is None:
            raise bad
        return origin(_coerce(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(elem_types, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, key): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, (str, os.PathLike)):
        return Path(value)
    if tp in (bool, int, float, str, _NONE) and type(value) is tp:  # exact type: True is not an int here
        return value
    raise bad


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _parse_text(tp: Any, text: str) -> Any:
    """Converts the text of a command-line value to the type `tp`; raises ValueError with a readable message."""
    arms = _arms(tp)
    if text.lower() in ("none", "null") and _NONE in arms:
        return None
    arms = tuple(a for a in arms if a is not _NONE)
    if len(arms) > 1:
        for arm in arms:
            try:
                return _parse_text(arm, text)
            except ValueError:
                pass
        raise ValueError(f"expected {_type_name(tp)}, got {text!r}")
    tp = arms[0]
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError(f"invalid choice {text!r} (choose from {', '.join(map(str, args))})")
    if origin in (tuple, list):
        items = [s.strip() for s in text.split(",")] if text.strip() else []
        if (elem_types := _elem_types(tp, len(items))) is None:
            raise ValueError(f"expected {_type_name(tp)}, got {len(items)} comma-separated items in {text!r}")
        return origin(_parse_text(t, s) for t, s in zip(elem_types, items, strict=True))
    if origin is dict or tp is Any:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if tp is Any:
                return text
            raise ValueError(f"expected JSON, got {text!r}") from None
        return _coerce(tp, value, "JSON value")
    if tp is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(f"expected true or false, got {text!r}")
        return _BOOLS[text.lower()]
    try:
        return tp(text)  # int, float (accepts 7e-6), str, Path
    except ValueError:
        raise ValueError(f"expected {_type_name(tp)}, got {text!r}") from None


def _coerce_tree(cls: type, data: Any, prefix: str = "") -> dict[str, Any]:
    """Checks a nested mapping against `cls`: known keys, right types. Returns it converted (still nested dicts)."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = config_to_dict(data)
    if not isinstance(data, dict):
        where = prefix[:-1] or "top level"
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields, out = _fields(cls), {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            raise ConfigError(f"{key}: unknown field" + (f"; did you mean {prefix}{close[0]}?" if close else ""))
        tp = _hints(cls)[name]
        out[name] = _coerce_tree(tp, value, key + ".") if _is_nested(tp) else _coerce(tp, value, key)
    return out


def _construct(cls: type[T], tree: dict[str, Any], prefix: str = "", base: Any = None) -> T:
    """Builds `cls` from a checked tree, on top of `base` (the field's default instance) if given."""
    kwargs = {}
    for name, f in _fields(cls).items():
        tp = _hints(cls)[name]
        if _is_nested(tp):
            sub_base = getattr(base, name) if base is not None else _default(f)
            if name in tree or sub_base is MISSING:
                sub_base = None if sub_base is MISSING else sub_base
                kwargs[name] = _construct(tp, tree.get(name, {}), f"{prefix}{name}.", sub_base)
        elif name in tree:
            kwargs[name] = tree[name]
        elif base is None and _default(f) is MISSING:
            raise ConfigError(f"{prefix}{name}: required field is missing")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (ValueError, TypeError) as err:  # from __post_init__: blame the field its message names first
        hits = [(m.start(), n) for n in _fields(cls) if (m := re.search(rf"\b{re.escape(n)}\b", str(err)))]
        where = prefix + min(hits)[1] if hits else prefix[:-1] or cls.__name__
        raise ConfigError(f"{where}: {err}") from err


# --- public API --------------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested plain dict: dataclasses as dicts, tuples as lists, Paths as str."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {name: plain(getattr(value, name)) for name in _fields(type(value))}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return str(value) if isinstance(value, Path) else value

    return plain(cfg)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Builds `cls` from a nested mapping (missing keys keep their defaults); ConfigError names `source` and the key."""
    try:
        return _construct(cls, _coerce_tree(cls, data))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data or {}


def load_config(cls: type[T], path: str | Path) -> T:
    """Reads a YAML preset or a saved config; missing keys keep their defaults."""
    return config_from_dict(cls, _read_yaml(path), source=str(path))


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes `cfg` as YAML, atomically, so that `load_config` gives back an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    write_text_atomic(path, text)


def _flag(key: str) -> str:
    return "--" + re.sub(r"[._]", "-", key)


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(_show, value)) or "''"
    return json.dumps(value) if isinstance(value, dict) else str(value) or "''"


def _metavar(tp: Any) -> str:
    """INT, FLOAT,..., {a,b}, JSON: the type of an optional field without its None."""
    tp = next(a for a in _arms(tp) if a is not _NONE)
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin in (tuple, list):
        return f"{_metavar(args[0]) if args else 'STR'},..."
    return "JSON" if origin is dict else _type_name(tp) if origin is Literal else _type_name(tp).upper()


_EPILOG = (
    "Precedence: dataclass defaults < --config preset < flags. Every flag also accepts the dotted spelling\n"
    "(--optim.weight_decay); booleans take --flag, --no-flag or --flag true|false; 'none' sets an optional\n"
    "field to None; lists are comma-separated; dict fields take JSON."
)


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of `cls` (see the module docstring); raises ValueError if two fields share a flag."""
    parser = argparse.ArgumentParser(
        description=description or _class_doc(cls), epilog=_EPILOG, allow_abbrev=False,
        usage="%(prog)s [-h] [--config FILE] [--FIELD VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # recipe docstrings carry command lines: keep them
    )
    parser.add_argument("--config", metavar="FILE", help="YAML preset: a nested mapping of the fields below.")
    owner = {"-h": "--help", "--help": "--help", "--config": "--config"}
    groups: dict[str, str | None] = {}
    containers: dict[str, Any] = {"": parser}
    for leaf in _walk(cls, "", None, groups):
        spellings = [_flag(leaf.key), "--" + leaf.key]
        negations = ["--no-" + s[2:] for s in spellings] if bool in _arms(leaf.type) else []
        for s in dict.fromkeys(spellings + negations):
            if owner.setdefault(s, leaf.key) != leaf.key:
                raise ValueError(f"{cls.__name__}: {owner[s]} and {leaf.key} both map to the flag {s}")
        group_key = leaf.key.rpartition(".")[0]
        if group_key not in containers:
            containers[group_key] = parser.add_argument_group(group_key, groups[group_key])
        default = "required" if leaf.default is MISSING else f"default: {_show(leaf.default)}"
        help_text = f"{leaf.doc} ({_type_name(leaf.type)}; {default})".strip().replace("%", "%%")
        # SUPPRESS: only flags actually given reach the namespace, so they override the preset and nothing else.
        kwargs: dict[str, Any] = dict(dest=leaf.key, default=argparse.SUPPRESS, metavar=_metavar(leaf.type))
        kwargs["type"] = functools.partial(_from_cli, leaf.type)
        if negations:
            kwargs.update(nargs="?", const=True)
        for i, s in enumerate(dict.fromkeys(spellings)):
            containers[group_key].add_argument(s, help=argparse.SUPPRESS if i else help_text, **kwargs)
        for s in dict.fromkeys(negations):
            containers[group_key].add_argument(
                s, dest=leaf.key, action="store_const", const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
    return parser


def _from_cli(tp: Any, text: str) -> Any:
    try:
        return _parse_text(tp, text)
    except ValueError as err:  # argparse prints ArgumentTypeError as "argument --flag: <message>"
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Builds `cls` from defaults, the `--config` YAML preset and command-line flags (in increasing precedence).

    `argv` defaults to sys.argv[1:]. Errors print usage and a message naming the file and dotted key, then exit 2.
    """
    parser = build_parser(cls, description)
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [_flag(leaf.key) for leaf in _walk(cls, "", None, {})] + ["--config"]
        close = difflib.get_close_matches(extra[0].split("=")[0], flags, n=1) if extra[0].startswith("--") else []
        parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; did you mean {close[0]}?" if close else ""))
    overrides = vars(args)
    path = overrides.pop("config")
    try:
        data = _read_yaml(path) if path else {}
    except ConfigError as err:  # the message names the file
        parser.error(str(err))
    try:
        tree = _coerce_tree(cls, data)
    except ConfigError as err:
        parser.error(f"{path}: {err}")
    for key, value in overrides.items():
        *parents, name = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = value
    try:
        return _construct(cls, tree)
    except ConfigError as err:
        parser.error(f"invalid config: {err}")
