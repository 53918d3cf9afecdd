"""Typed configuration: YAML files and ``--set a.b=value`` overrides into dataclasses.

Each component owns a ``@dataclass(kw_only=True)`` config whose ``__post_init__`` raises
``ValueError`` on bad values. :func:`load_config` builds one from a YAML mapping, raising
:class:`ConfigError` with the full key path for unknown keys and wrong types, and with
``file:line:column`` for YAML that does not parse.

Configs travel: ``-c NAME`` (no ``/``, no ``.yaml`` suffix, not an existing file) is a shipped config,
``configs/NAME.yaml`` in the package (:func:`shipped_configs`); anything else is a file. A field annotated
:data:`FilePath` holds a path: written in a YAML file it is relative to that file's directory and is made
absolute, so a config works from any directory. Two exceptions keep the shipped configs usable as
templates: their own relative paths (``out_dir: runs``) stay relative to the current directory, as every
``--set`` value does, and ``{out}`` templates stay as written. A field annotated :data:`ConfigRef` names
another config (a pipeline stage's): a file as above, or a name, which finds ``NAME.yaml`` beside the
referring file first (a set copied out with ``spinestream configs copy`` refers to itself), then a
shipped config.

The command-line helpers every verb shares live here too: :func:`field_docs` (a field's
docstring is the string literal right after it), :func:`config_fields_help` (the fields of a
config, nested ones dotted, for a verb's ``--help``), :func:`print_config` (``--print-config``),
:class:`HelpFormatter` (defaults only where they say something), and :func:`add_config_arguments` with
:func:`config_from_args` (``-c``, ``--set`` and a verb's flags, made from its config's fields).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeVar

import yaml

from spinestream import SpinestreamError

T = TypeVar("T")

#: where the shipped configs live: ``<checkout>/configs``, or ``spinestream/configs`` installed (pyproject maps
#: the folder to the package ``spinestream.configs``, data ``*.yaml``); beside this package either way
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"
YAML_SUFFIXES = (".yaml", ".yml")


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


PATH = _Marker("PATH")
CONFIG = _Marker("CONFIG")
#: a config field that holds a file or directory (relative to its YAML file's directory, see the module doc)
FilePath = Annotated[str, PATH]
#: a config field that names another config file (a path, or a shipped config's name)
ConfigRef = Annotated[str, CONFIG]


class ConfigError(SpinestreamError, ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


def _check(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        kt, vt = args or (Any, Any)
        return {_check(k, kt, path): _check(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
        kwargs[key] = _check(value, hints[key], path)
    missing = [n for n, f in fields.items() if n not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix or cls.__name__}: missing key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def parse(tp: type[T], value: Any, where: str) -> T:
    """``value`` (read from JSON or YAML) as ``tp`` by the rules :func:`load_config` applies: the one
    parser of the records stored inside other files (the manifest, a run's shard spec). Errors are
    :class:`ConfigError` naming ``where`` and the key path; an instance of ``tp`` passes as it is."""
    return _check(value, tp, where)


def parse_overrides(items: list[str] | None) -> dict:
    """``["a.b=1", "c=[1,2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set image_size=384")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: not valid YAML ({_yaml_problem(e, 'column')}); quote a value "
                              f"that holds brackets or ': ', e.g. --set \"round2.set=['data.label_tables=[a, b]']\"") \
                from None
    return out


def _yaml_problem(e: yaml.YAMLError, where: str = "") -> str:
    """What a YAML error says, one line: ``3:7: mapping values are not allowed here`` (1-based line:column), or
    with ``where="column"`` (a one-line --set value) ``column 7: ...``."""
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    if mark is None:
        return problem
    if where == "column":
        return f"column {mark.column + 1}: {problem}"
    return f"{mark.line + 1}:{mark.column + 1}: {problem}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config (``configs/*.yaml``), sorted by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def is_config_path(ref: str | Path) -> bool:
    """Whether ``-c ref`` means a file (an existing file, or a path with a ``/`` or a YAML suffix) rather than the
    name of a shipped config. A directory does not count: ``spinestream demo --dir demo`` makes one, and
    ``-c demo`` must still be the shipped demo."""
    text = str(ref)
    return "/" in text or text.endswith(YAML_SUFFIXES) or Path(text).is_file()


def resolve_config(ref: str | Path) -> Path:
    """The file ``-c ref`` means: ``ref`` itself when it is a path (:func:`is_config_path`), else the shipped
    config of that name; ConfigError listing the shipped names when there is none."""
    if is_config_path(ref):
        p = Path(ref)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    shipped = shipped_configs()
    if str(ref) not in shipped:
        raise ConfigError(f"-c {ref}: no such config file, and no shipped config of that name (shipped: "
                          f"{', '.join(shipped)}; a file needs a / or a .yaml suffix)")
    return shipped[str(ref)]


def read_yaml(path: Path) -> dict:
    """A config file's top-level mapping; ConfigError ``path:line:column: problem`` when it does not parse."""
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}:{_yaml_problem(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def _markers(tp: Any) -> tuple:
    return tuple(a for a in getattr(tp, "__metadata__", ()) if isinstance(a, _Marker))


def _unwrap(tp: Any) -> Any:
    """The dataclass inside ``tp`` (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return found[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and found else None


def _resolve_value(value: str, marker: _Marker, base: Path, shipped: bool, beside: bool) -> str:
    if value.startswith("{out}"):
        return value
    if marker is CONFIG and not is_config_path(value):
        there = base / f"{value}.yaml"
        return str(there.absolute()) if beside and there.is_file() and not shipped else value
    if shipped or Path(value).expanduser().is_absolute():
        return value
    return os.path.normpath(base / value)  # base is absolute: ``../runs`` beside the file reads as it should


def resolve_paths(cls: type, data: dict, base: Path, shipped: bool = False, beside: bool = True) -> dict:
    """``data`` (a YAML mapping for ``cls``) with its :data:`FilePath` and :data:`ConfigRef` values resolved
    against ``base``, the YAML file's directory (see the module doc; ``shipped``: a shipped config's;
    ``beside``: a config's name finds ``base/NAME.yaml`` first)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = dict(data)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue  # unknown: _build names it
        inner = _unwrap(tp)
        if inner is not None and isinstance(value, dict):
            out[key] = resolve_paths(inner, value, base, shipped, beside)
            continue
        for marker in _markers(tp) or [m for a in typing.get_args(tp) for m in _markers(a)]:
            if isinstance(value, str):
                out[key] = _resolve_value(value, marker, base, shipped, beside)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from an optional YAML file (a path or a shipped config's name, :func:`resolve_config`) plus
    ``--set`` overrides (these win). Paths in the file are relative to it (see the module doc); ``--set``
    values stay as given (relative to the current directory)."""
    data: dict = {}
    if path is not None:
        p = resolve_config(path)
        base = p.resolve().parent
        data = resolve_paths(cls, read_yaml(p), base, shipped=base == SHIPPED_DIR)
    data = _merge(data, parse_overrides(overrides))
    return _build(cls, data)


def _plain_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):  # init fields only: what load_config reads back
        return {f.name: _plain_value(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain_value(x) for k, x in v.items()}
    return v


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable dict of a config dataclass (tuples become lists), its init fields only (a
    field the loader cannot set, such as a path the pipeline owns, is left out)."""
    return _plain_value(cfg)


# --------------------------------------------------------------------------- command-line help


def plain(text: str) -> str:
    """Docstring text without reStructuredText markup (roles and backquotes), for ``--help``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"`([^`]+)`", r"\1", text)


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring (the string literal right after the field in the class body), for
    ``cls`` and its dataclass bases; fields without one are absent."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no docstrings
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_value(value: Any) -> str:
    """A config value as it would be written in YAML (flow style: ``[400.0, 1800.0]``)."""
    text = yaml.safe_dump(_plain_value(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def _field_lines(cls: type, prefix: str, width: int) -> list[str]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, name = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            lines += _field_lines(tp, name + ".", width)
            continue
        default = _default(f)
        head = f"  {name}: {_type_name(tp)}" + ("" if default is dataclasses.MISSING else f" = {format_value(default)}")
        lines.append(head)
        if f.name in docs:
            lines += textwrap.wrap(plain(docs[f.name]), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def config_fields_help(cls: type, title: str | None = None, width: int = 100) -> str:
    """The fields of config dataclass ``cls`` (nested configs walked, their keys dotted) with type,
    default and docstring: the epilog of a verb's ``--help`` (use :class:`HelpFormatter`)."""
    title = title or f"config fields ({cls.__name__}; set in the -c YAML file or with --set KEY=VALUE):"
    return "\n".join([title, *_field_lines(cls, "", width)])


class _ConfigDumper(yaml.SafeDumper):
    """Block mappings (one key a line, nested configs indented), flow lists (``windows: [[400.0, 1800.0]]``)."""


_ConfigDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def print_config(cfg: Any, file: TextIO | None = None) -> None:
    """``--print-config``: the resolved config as YAML (loadable with ``-c``), in field order. Its paths are
    absolute (relative ones, from ``--set`` or a shipped config, against the current directory), so the
    output loads as the same config wherever it is saved."""
    data = resolve_paths(type(cfg), to_dict(cfg), Path.cwd(), beside=False)
    text = yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=100)
    print(text, end="", file=file or sys.stdout)


PRINT_CONFIG_HELP = "print the resolved config (file, --set overrides and defaults) as YAML and exit"


def add_print_config(parser: argparse.ArgumentParser) -> None:
    """Add the shared ``--print-config`` flag (the verb prints :func:`print_config` and exits)."""
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the plain paragraphs of description and epilog but keeps any paragraph with an indented line
    as written (examples, the :func:`config_fields_help` list), and adds ``(default: X)`` only where a
    default says something: not for None, False, [] or a help text that already names its default."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = re.split(r"\n\s*\n", text.strip("\n"))
        out = []
        for par in paragraphs:
            lines = par.splitlines()
            if any(line[:1].isspace() for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(line.strip() for line in lines), width,
                                         initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS or (
                isinstance(default, (list, tuple)) and not default):
            return text
        shown = ":".join(map(str, default)) if isinstance(default, tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


# --------------------------------------------------------------------------- flags from config fields


def _flag_kwargs(tp: Any) -> dict | None:
    """The argparse keywords of a top-level field's flag, or None for a field that has none (nested configs,
    mappings, fixed-length tuples: those are set with ``-c`` or ``--set``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:  # X | None: the flag sets X
        rest = [a for a in args if a is not type(None)]
        return _flag_kwargs(rest[0]) if len(rest) == 1 else None
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if tp in (int, float, str):
        return {"type": tp}
    if typing.get_origin(tp) is list and args and args[0] in (int, float, str):
        return {"action": "append", "type": args[0]}
    return None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``-c/--config``, ``--set`` and ``--print-config``, plus one ``--field-name`` flag per top-level scalar or
    list field of config dataclass ``cls`` (help: its docstring; a bool is ``--x/--no-x``, a list flag repeats:
    ``--run A --run B``), so a verb declares each option once, in its config. :func:`config_from_args` reads
    them back with flag > ``--set`` > file > default."""
    parser.add_argument("-c", "--config", type=Path, default=None, help="YAML config file (--print-config writes one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set batch_size=16")
    add_print_config(parser)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    group = parser.add_argument_group(f"options ({cls.__name__} fields; a flag wins over -c and --set)")
    for f in dataclasses.fields(cls):
        kwargs = _flag_kwargs(hints[f.name]) if f.init else None
        if kwargs is None:
            continue
        default = _default(f)
        quiet = default is None or default is False or default == [] or default is dataclasses.MISSING
        shown = "" if quiet else f" (default: {format_value(default)})"
        metavar = {} if kwargs.get("action") is argparse.BooleanOptionalAction or "choices" in kwargs else {
            "metavar": f.name.upper()}
        # SUPPRESS: a flag not given is absent from the namespace, so it cannot mask the file or --set
        text = plain(docs.get(f.name, ""))
        text = f"{text.removesuffix('.')}{shown}." if shown else text
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"field.{f.name}", default=argparse.SUPPRESS,
                           help=text.replace("%", "%%"), **metavar, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from the arguments :func:`add_config_arguments` added: the ``-c`` file, then ``--set``, then
    the flags given (each passed as one more override, so the one loader checks and validates it)."""
    given = [f"{name.removeprefix('field.')}={format_value(value)}" for name, value in vars(args).items()
             if name.startswith("field.")]
    return load_config(cls, args.config, [*args.set, *given])


def verb_parser(cls: type, prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a typed verb: ``-c``, ``--set``, ``--print-config`` and one flag per field of ``cls``."""
    p = argparse.ArgumentParser(prog=prog, description=plain(doc or ""), formatter_class=HelpFormatter)
    add_config_arguments(p, cls)
    return p


def parse_verb_config(cls: type[T], prog: str, doc: str | None, argv: list[str] | None) -> T | None:
    """A typed verb's whole command line: ``cls`` from ``-c``, ``--set`` and one flag per field (``--help`` from
    ``doc`` and the fields' docstrings), or None once ``--print-config`` has printed it (the verb then exits 0).
    Errors are not caught: a :class:`ConfigError` reaches the console script, which prints it on one line."""
    args = verb_parser(cls, prog, doc).parse_args(argv)
    cfg = config_from_args(cls, args)
    if args.print_config:
        print_config(cfg)
        return None
    return cfg
